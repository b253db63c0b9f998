"""Redis memory of one streamed 256x256 job, through `ddpm serve` (issue 20's done-when).

A 256x256 RGB frame is 196 KB of pixels; with `snapshot_every: 1` a job of 8 images x 60
steps makes 480 of them. This measures what such a job costs Redis and what its client
sees, end to end, with everything at its defaults:

  1. A random-weight 256x256 RGB UNet of tiny width (`ch` 8, six levels, one block, no
     attention: 294k parameters at `--ch 8`) saved into a temporary models dir, and
     `ddpm serve` started on it (its embedded Redis, one worker, the API; `--device`).
  2. `POST /v1/generations`: --images x --steps, `snapshot_every` --every, `snapshot_kind`
     --kind, a fixed --seed; follow `GET /v1/generations/{id}/events` (SSE) to the end,
     counting the snapshot frames of each image (and their bytes, format, side, and the
     `dropped` the worker reports). Redis's `used_memory` is read before the POST, every
     --sample-s while the job runs (the peak) and after the stream ends; then the job's
     own keys, each with `MEMORY USAGE ... SAMPLES 0`: `ddpm:events:{id}`,
     `ddpm:image:{id}:*`, `ddpm:frames:{id}*`, `rq:job:{id}` (and any other key naming
     the id). The final images are downloaded.
  3. The same request with `snapshot_every: 0`; its final images must be byte-identical
     to the first run's, and PNGs of the model's size.

Prints the Redis growth in MB (used_memory after - before, the peak, and the job's keys),
frames seen per image, whether the images are identical, the worker's snapshot metrics
(dropped frames, writer waits) and its peak RSS. The issue's target: growth <= 16 MB for
8 x 60 with `snapshot_every: 1`, `xt`, frames of every image seen, images identical.

    python -m bench.stream_memory                                # 8 images x 60 steps
    python -m bench.stream_memory --images 2 --steps 10          # a short run
    python -m bench.stream_memory --device cuda --json stream-memory.json

Not a test: nothing here asserts a figure; the exit status is 1 when a request fails.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from PIL import Image

from contract.frame_plan import snapshot_steps
from contract.spec import GenerationSpec
from ddpm.processes import child_kwargs, stop
from ddpm.redis_server import free_port
from models import DiffusionConfig, ModelConfig, UNetConfig, build_network, init_checkpoint

MODEL = "r256"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MB = 1e6


class BenchError(RuntimeError):
    """A request that did not go as it must: the figures would mean nothing."""


def model_config(side: int, ch: int) -> ModelConfig:
    """The 256x256 presets' shape (six levels, σ² = β̃) at a tiny width, no attention."""
    return ModelConfig(
        unet=UNetConfig(image_size=side, in_channels=3, ch=ch, ch_mult=(1, 1, 2, 2, 4, 4),
                        num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                        norm_groups=min(8, ch)),
        diffusion=DiffusionConfig(variance_type="fixed_small"))


# -- the server ----------------------------------------------------------------------------


class Serve:
    """`ddpm serve` as a child process; its output goes to `log` and is scanned for the
    embedded Redis's URL."""

    def __init__(self, models: Path, port: int, metrics_port: int, device: str,
                 log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DDPM_REDIS_URL"}
        env.setdefault("DDPM_LOG_LEVEL", "WARNING")
        self.base = f"http://127.0.0.1:{port}"
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        self.redis_url: str | None = None
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self._log_lock = threading.Lock()   # the reader may outlive stop's join (children)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ddpm", "serve", "--models-dir", str(models),
             "--host", "127.0.0.1", "--port", str(port), "--device", device,
             "--metrics-port", str(metrics_port), "--ephemeral"],   # each run its own
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **child_kwargs())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            with self._log_lock:
                if self._log.closed:
                    return
                self._log.write(line)
                self._log.flush()
            m = re.search(r"redis at (redis://[^\s;]+)", line)
            if m:
                self.redis_url = m.group(1)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"ddpm serve exited with code {self.proc.returncode} "
                                 f"(log: {self._log.name})")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.base}/readyz", timeout=2) as r:
                if r.status == 200 and self.redis_url:
                    return
            time.sleep(0.2)
        raise BenchError(f"ddpm serve not ready within {timeout:.0f} s (log: {self._log.name})")

    def worker_pid(self) -> int | None:
        """The worker: the child of `ddpm serve` running `ddpm worker`."""
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (d / "stat").read_text().rpartition(")")[2].split()
                if int(stat[1]) == self.proc.pid and \
                        b"worker" in (d / "cmdline").read_bytes():
                    return int(d.name)
        return None

    def stop(self) -> None:
        stop(self.proc, timeout=30)
        self._reader.join(timeout=5)
        with self._log_lock:
            self._log.close()


def rss_peak_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return None


def worker_metrics(url: str) -> dict[str, float]:
    """The worker's snapshot and writer metrics (absent ones are simply not there)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not re.match(
                r"ddpm_worker_(snapshot|writer|redis_full|images|oom)", line):
            continue
        name, _, value = line.rpartition(" ")
        if name.partition("{")[0].endswith("_created"):
            continue
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


# -- HTTP ----------------------------------------------------------------------------------


def post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def sse(url: str, timeout: float) -> Iterator[tuple[str, str]]:
    """(event, data) of a Server-Sent Events stream, until the server closes it."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        event, data = "message", []
        for raw in r:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))


# -- one job -------------------------------------------------------------------------------


@dataclass
class JobRun:
    every: int
    expected: int = 0                # frames per image the spec says the job emits
    id: str = ""
    seconds: float = 0.0             # POST to the end of the event stream
    first_frame_s: float | None = None
    frames: dict[int, int] = field(default_factory=dict)      # image index → frames seen
    frame_bytes: int = 0             # decoded bytes of every frame seen
    formats: dict[str, int] = field(default_factory=dict)     # "jpeg 128" → frames
    dropped: int = 0                 # sum of the frames' `dropped`
    events: dict[str, int] = field(default_factory=dict)
    terminal: str = ""
    used_before: int = 0
    used_peak: int = 0
    used_after: int = 0
    keys: dict[str, int] = field(default_factory=dict)        # key → MEMORY USAGE
    stream_entries: int = 0
    stream_frame_bytes: int = 0      # frame bytes still in the stream at the end
    images: list[bytes] = field(default_factory=list, repr=False)

    @property
    def growth_mb(self) -> float:
        return (self.used_after - self.used_before) / MB

    @property
    def peak_growth_mb(self) -> float:
        return (self.used_peak - self.used_before) / MB

    @property
    def keys_mb(self) -> float:
        return sum(self.keys.values()) / MB


def _key_kind(key: str, job_id: str) -> str:
    """`ddpm:image:{id}:3` → `ddpm:image:{id}:*`."""
    return re.sub(r":\d+$", ":*", key.replace(job_id, "{id}"))


def run_job(serve: Serve, r: redis.Redis, body: dict[str, Any], sample_s: float,
            timeout: float) -> JobRun:
    run = JobRun(every=body["snapshot_every"],
                 expected=len(snapshot_steps(GenerationSpec(**body).steps_per_image,
                                             body["snapshot_every"])))
    time.sleep(0.5)                     # let the last job's writes and expiries settle
    run.used_before = run.used_peak = int(r.info("memory")["used_memory"])
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(sample_s):
            with contextlib.suppress(redis.RedisError):
                run.used_peak = max(run.used_peak, int(r.info("memory")["used_memory"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        status, doc = post_json(f"{serve.base}/v1/generations", body)
        if status != 202:
            raise BenchError(f"POST /v1/generations ({body}): {status} {json.dumps(doc)}")
        run.id = doc["id"]
        frames: Counter[int] = Counter()
        kinds: Counter[str] = Counter()
        formats: Counter[str] = Counter()
        for event, data in sse(f"{serve.base}/v1/generations/{run.id}/events", timeout):
            kinds[event] += 1
            if event == "snapshot":
                d = json.loads(data)
                if run.first_frame_s is None:
                    run.first_frame_s = time.perf_counter() - t0
                frames[int(d["index"])] += 1
                blob = d.get("image") or d.get("png") or ""
                run.frame_bytes += len(base64.b64decode(blob))
                formats[f"{d.get('format', 'png')} {d.get('size', '?')}"] += 1
                run.dropped += int(d.get("dropped", 0))
            elif event in ("done", "error", "canceled"):
                run.terminal = event
                if event != "done":
                    raise BenchError(f"job {run.id} ended with {event}: {data[:500]}")
        run.seconds = time.perf_counter() - t0
    finally:
        stop_sampling.set()
        sampler.join()
    if run.terminal != "done":
        raise BenchError(f"the event stream of {run.id} ended without `done`")
    run.frames = {i: frames.get(i, 0) for i in range(body["num_images"])}
    run.events, run.formats = dict(kinds), dict(formats)

    time.sleep(0.2)
    run.used_after = int(r.info("memory")["used_memory"])
    run.used_peak = max(run.used_peak, run.used_after)
    for key in r.scan_iter(match=f"*{run.id}*", count=1000):
        k = key.decode()
        run.keys[k] = int(r.memory_usage(k, samples=0) or 0)
    events_key = f"ddpm:events:{run.id}"
    run.stream_entries = int(r.xlen(events_key))
    for _, fields in r.xrange(events_key):
        run.stream_frame_bytes += len(fields.get(b"image") or fields.get(b"png") or b"")
    for i in range(body["num_images"]):
        run.images.append(get_bytes(f"{serve.base}/v1/generations/{run.id}/images/{i}"))
    return run


def check_png(blob: bytes, side: int) -> str | None:
    """None if `blob` is a PNG of side x side RGB pixels, else what is wrong."""
    if not blob.startswith(PNG_SIGNATURE):
        return "not a PNG"
    im = Image.open(io.BytesIO(blob))
    if im.format != "PNG" or im.size != (side, side) or im.mode != "RGB":
        return f"{im.format} {im.mode} {im.size}"
    return None


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=1, help="snapshot_every of the first run")
    p.add_argument("--kind", default="xt", choices=("xt", "x0"), help="snapshot_kind")
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--size", type=int, default=256, help="the model's side in pixels")
    p.add_argument("--ch", type=int, default=8, help="the UNet's base width")
    p.add_argument("--device", default="auto", help="ddpm serve --device")
    p.add_argument("--extra", default="{}",
                   help="JSON merged into the first request (e.g. snapshot_format)")
    p.add_argument("--sample-s", type=float, default=0.1,
                   help="how often Redis's used_memory is read while the job runs")
    p.add_argument("--timeout", type=float, default=1800, help="per job, seconds")
    p.add_argument("--log", type=Path, help="ddpm serve's output (default: a temp file)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()

    cfg = model_config(args.size, args.ch)
    params = sum(t.numel() for t in build_network(cfg.unet).parameters())
    body = {"model": MODEL, "num_images": args.images, "steps": args.steps, "seed": args.seed,
            "snapshot_every": args.every, "snapshot_kind": args.kind,
            **json.loads(args.extra)}
    print(f"model: {args.size}x{args.size} RGB UNet, ch {args.ch}, ch_mult "
          f"{cfg.unet.ch_mult}, {params / 1e3:.1f}k parameters (random); device {args.device}")
    print(f"job: {json.dumps(body)}; then the same with snapshot_every 0")

    with tempfile.TemporaryDirectory(prefix="ddpm-stream-memory-") as tmp:
        models = Path(tmp) / "models"
        init_checkpoint(models / MODEL, cfg, seed=0)
        log = args.log or Path(tmp) / "serve.log"
        t0 = time.perf_counter()
        serve = Serve(models, free_port(), free_port(), args.device, log)
        try:
            serve.wait_ready(300)
            startup = time.perf_counter() - t0
            assert serve.redis_url
            r = redis.Redis.from_url(serve.redis_url)
            maxmemory = r.config_get("maxmemory").get("maxmemory")
            policy = r.config_get("maxmemory-policy").get("maxmemory-policy")
            print(f"ddpm serve up in {startup:.1f} s; Redis {serve.redis_url}, maxmemory "
                  f"{maxmemory} ({policy})")
            with_frames = run_job(serve, r, body, args.sample_s, args.timeout)
            metrics = worker_metrics(serve.metrics)
            rss = rss_peak_mb(serve.worker_pid())
            without = run_job(serve, r, {**body, "snapshot_every": 0}, args.sample_s,
                              args.timeout)
        except BenchError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            if args.log:
                print(f"(ddpm serve's log: {log})", file=sys.stderr)
            else:
                print("ddpm serve's log, its end:", file=sys.stderr)
                with contextlib.suppress(OSError):
                    print(log.read_text()[-4000:], file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            serve.stop()

    report(args, with_frames, without, metrics, rss)


def report(args: argparse.Namespace, a: JobRun, b: JobRun, metrics: dict[str, float],
           rss: float | None) -> None:
    n_frames = sum(a.frames.values())
    print(f"\nrun 1 (snapshot_every {a.every}): job {a.id}, {a.seconds:.1f} s "
          f"(first frame after {a.first_frame_s or 0:.1f} s); events {a.events}")
    print(f"  frames seen per image: {[a.frames[i] for i in sorted(a.frames)]} "
          f"(of {a.expected} each); {n_frames} frames, "
          f"{a.frame_bytes / max(n_frames, 1) / 1e3:.1f} KB each on average; "
          f"{a.formats}; dropped (as reported) {a.dropped}")
    by_kind: dict[str, int] = defaultdict(int)
    for k, v in a.keys.items():
        by_kind[_key_kind(k, a.id)] += v
    print(f"  Redis used_memory: +{a.growth_mb:.2f} MB after the job "
          f"(peak +{a.peak_growth_mb:.2f} MB while it ran)")
    print(f"  the job's keys: {a.keys_mb:.2f} MB — "
          + ", ".join(f"{k} {v / MB:.2f} MB" for k, v in sorted(by_kind.items())))
    print(f"  events stream: {a.stream_entries} entries, {a.stream_frame_bytes / MB:.2f} MB "
          "of frames in it")
    if metrics:
        print("  worker metrics: " + ", ".join(f"{k} {v:g}" for k, v in metrics.items()))
    if rss is not None:
        print(f"  worker peak RSS (VmHWM) after run 1: {rss:.0f} MB")
    print(f"run 2 (snapshot_every 0): job {b.id}, {b.seconds:.1f} s; Redis "
          f"+{b.growth_mb:.2f} MB, its keys {b.keys_mb:.2f} MB")

    bad = [f"image {i}: {why}" for i, blob in enumerate(a.images + b.images)
           if (why := check_png(blob, args.size))]
    same = [x == y for x, y in zip(a.images, b.images, strict=True)]
    print(f"\nRedis growth for the job: {a.growth_mb:.2f} MB (used_memory; peak "
          f"{a.peak_growth_mb:.2f} MB; its keys {a.keys_mb:.2f} MB); target <= 16 MB")
    print(f"frames seen per image: {[a.frames[i] for i in sorted(a.frames)]}"
          f" — every image: {'yes' if all(a.frames.values()) else 'NO'}")
    print(f"final images identical to the run without snapshots: "
          f"{'yes' if all(same) else 'NO'} ({sum(same)}/{len(same)}); "
          f"lossless PNG {args.size}x{args.size} RGB: {'yes' if not bad else 'NO ' + str(bad)}")
    if args.json:
        doc = {"args": {k: str(v) for k, v in vars(args).items()},
               "runs": [{**{k: v for k, v in asdict(run).items() if k != "images"},
                         "growth_mb": run.growth_mb, "peak_growth_mb": run.peak_growth_mb,
                         "keys_mb": run.keys_mb} for run in (a, b)],
               "identical": all(same), "png_problems": bad, "worker_metrics": metrics,
               "worker_peak_rss_mb": rss}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
