"""Service efficiency: the whole stack (HTTP → Redis → worker → result) under N concurrent
clients each asking for one image, against the raw engine making the same images in-process,
and everything against the raw sampler.

The stack is real and in separate processes: an embedded Redis, `ddpm worker` and
`ddpm api` (uvicorn). N client tasks (asyncio + aiohttp, in this process: ~1 ms of CPU per
request cycle, which shares the cores with the servers) each POST a 1-image request, follow
its Server-Sent Events until `done`, download the PNG, and submit again at once (a closed
loop) until K images are made. The peer is `worker.engine.Engine` driven in this process the
way the worker drives it, with the same model, device, max batch and specs, N requests
outstanding at a time (refilled as each finishes), waiting for a free slot just as a queued
job would. Everything is measured again with `--max-batch 1`, to show what continuous
batching buys. Latencies count from the submit: to the first frame (the first `snapshot`
event — the first progress report when --snapshot-every is 0) and to completion (`done`
received and the PNG downloaded; for the engine, the step that finished the image).

The ceiling is `models.sample` in this process on the same images in batches of
--max-batch (no engine, no Redis, no PNGs). The last table puts every stack run against it:
images/s, and "server CPU" = CPU ms per image of the API, the worker and Redis together,
against the sampler's own CPU ms per image. `--big K` adds K-image requests (POST → SSE to
`done` → GET the grid) from --big-clients clients. With `--preset null` (a forward of ~zero
cost) that table is what the serving stack itself costs, on any machine.

Ratios are within one run. The goal is stack/raw ≥ 0.9 at saturation (clients ≥ max batch),
where the GPU, not the per-request overhead, should set the pace; with exactly max-batch
clients each slot still idles for a request's turnaround (PNG download, next POST, dequeue),
so twice that keeps the batch full (see the occupancy column). On a small CPU machine the
servers, Redis, the clients and the UNet share the same cores, so the CPU time per image of
each process is printed too, with the worker's own step statistics (from its metrics port).

    python -m bench.service                                          # tiny preset, CPU, quick
    python -m bench.service --clients 1,4,16,32 --images 128 --repeats 3 --json service.json
    python -m bench.service --preset null --max-batch 64 --steps 20 --sampler ddim \\
        --snapshot-every 0 --images 256 --clients 32 --big 64 --big-clients 2 \\
        --skip-batch1 --repeats 3 --json service-null.json      # the serving ceiling
    python -m bench.service --preset null --max-batch 64 --snapshot-every 0 \\
        --clients 64,128,256 --images 512 --skip-batch1                # many clients
    python -m bench.service --preset cifar10 --device cuda --max-batch 128 \\
        --clients 1,32,128,256 --images 1024 --steps 50 --json service-gpu.json
    python -m bench.service --checkpoint checkpoints/mnist --device cuda
    python -m bench.service --clients 16 --skip-batch1 --prefill-keys 100000   # a full Redis
    python -m bench.service --preset null --max-batch 64 --snapshot-every 0 --images 256 \
        --clients 32 --skip-batch1 --conditioned 0.5      # half img2img/inpainting requests

The client drops idle connections after CLIENT_KEEPALIVE_S, before uvicorn's keep-alive
timeout (5 s) closes them: a client that kept them as long (httpx's default) sometimes sent
a request on a connection the server was closing and died with a read error (a reset) at
64+ clients. The API's per-caller stream cap (`DDPM_MAX_STREAMS_PER_CALLER`, 429 past it)
is raised for the run, since all the clients are one caller.

Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import re
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis
import torch
from PIL import Image

from bench.api_overhead import (
    Child,
    cpu_seconds,
    percentile,
    prefill,
    run_async,
    start_api,
    stop_on_sigterm,
    versions,
)
from bench.redis_profile import RedisProfile, table
from bench.worker_throughput import sample_in_process
from contract.keys import worker_key
from contract.spec import GenerationSpec
from ddpm.redis_server import RedisServer, free_port
from ddpm.serve import worker_torch_threads
from models import PRESETS, ModelConfig, init_checkpoint, preset, resolve_device
from worker.catalog import load_models
from worker.engine import Engine, LoadedModel
from worker.settings import WorkerSettings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKER_START_TIMEOUT = 300.0
CLIENT_KEEPALIVE_S = 2.0     # < uvicorn's keep-alive timeout (5 s): see stack_load


class BenchError(RuntimeError):
    """A request that did not end in an image: the numbers would mean nothing."""


@dataclass
class Sample:
    """One request, seconds from its submit."""

    first_frame: float
    done: float
    submit: float = 0.0          # the POST's own latency (stack only)
    events: int = 0              # SSE events received (stack only)


@dataclass
class EngineStats:
    """What the engine's loop did during a run: steps, how full they were, and how much of
    the wall time went into the batched forward (host time; on CUDA it tracks the GPU's)."""

    steps: int
    occupancy: float             # mean active slots / max batch over the steps
    forward_s: float             # summed over the steps

    def share(self, wall: float) -> float:
        return self.forward_s / wall

    def other_ms_per_step(self, wall: float) -> float:
        """Loop time outside the forward per step: admission, events, Redis, idling."""
        return (wall - self.forward_s) * 1e3 / max(self.steps, 1)


@dataclass
class Run:
    """K images at one concurrency on one side (stack or raw)."""

    side: str
    max_batch: int
    clients: int
    images: int
    seconds: float
    samples: list[Sample] = field(repr=False, default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)    # process → CPU ms per image
    redis_keys: int = 0                  # keys in Redis when the run started
    redis_commands: float = 0.0          # Redis commands per image (all clients of Redis)
    redis_by_command: dict[str, float] = field(default_factory=dict)   # the same, by command
    redis_round_trips: float = 0.0       # reads Redis served per image (a pipeline is one)
    engine: EngineStats | None = None
    request_images: int = 1              # images per request (stack) or per batch (sampler)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def server_cpu_ms(self) -> float:
        """CPU ms per image of the serving processes together (API, worker, Redis); for
        the in-process sides, of this process."""
        own = [c for c in ("api", "worker", "redis") if c in self.cpu_ms]
        return sum(self.cpu_ms[c] for c in own) if own else \
            sum(v for k, v in self.cpu_ms.items() if k != "client")

    def pct(self, what: str, q: float) -> float:
        return percentile([getattr(s, what) for s in self.samples], q) * 1e3

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "samples"}
        out["images_per_s"] = self.images_per_s
        if self.engine:
            out["engine"] |= {"forward_share": self.engine.share(self.seconds),
                              "other_ms_per_step": self.engine.other_ms_per_step(self.seconds)}
        out["server_cpu_ms"] = self.server_cpu_ms
        if self.samples:
            for what in ("first_frame", "done", "submit"):
                for q in (50, 99):
                    out[f"{what}_p{q}_ms"] = self.pct(what, q)
            out["events_per_request"] = sum(s.events for s in self.samples) / len(self.samples)
        return out


# -- the stack -----------------------------------------------------------------------------


def request_body(spec: GenerationSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", include={"model", "num_images", "sampler", "steps",
                                                 "seed", "snapshot_every"})


@dataclass(frozen=True)
class Conditioned:
    """`--conditioned F`: that fraction of the stack's requests carry an input image of the
    model's size (base64 PNG), alternately img2img at strength 0.8 and inpainting of the
    lower half: the mix of plain and image-conditioned jobs in one batch."""

    fraction: float
    image: str
    mask: str

    @classmethod
    def make(cls, fraction: float, size: int, channels: int) -> Conditioned:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 2:] = 255
        return cls(fraction, _b64_png(image), _b64_png(Image.fromarray(mask)))

    def bodies(self, specs: list[GenerationSpec]) -> list[dict[str, Any]]:
        out, due, kind = [], 0.0, 0
        for spec in specs:
            body = request_body(spec)
            due += self.fraction
            if due >= 1.0:
                due -= 1.0
                body["init_image"] = self.image
                if kind % 2:
                    body["mask"] = self.mask
                else:
                    body["strength"] = 0.8
                kind += 1
            out.append(body)
        return out


def _b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def job_events(client: aiohttp.ClientSession, job_id: str
                     ) -> AsyncIterator[tuple[str, str]]:
    """A job's SSE events as (event, data) until the server ends the stream (after `done`:
    reading to the end lets the client reuse the connection); `error`, `canceled` and
    `requeued` raise, since a benchmark's job must run once and succeed."""
    async with client.get(f"/v1/generations/{job_id}/events") as resp:
        if resp.status != 200:
            raise BenchError(f"events of {job_id}: {resp.status} {(await resp.text())[:300]}")
        event, data = "", ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif not line and event:
                if event in ("error", "canceled", "requeued"):
                    raise BenchError(f"job {job_id}: {event} {data[:300]}")
                yield event, data
                event = ""


async def fetch_result(client: aiohttp.ClientSession, job_id: str, num_images: int) -> None:
    """Download the job's image (the grid of a several-image job) and check it is a PNG."""
    path = "images/0" if num_images == 1 else "grid.png"
    async with client.get(f"/v1/generations/{job_id}/{path}") as img:
        content = await img.read()
        if img.status != 200 or not content.startswith(PNG_SIGNATURE):
            raise BenchError(f"{path} of {job_id}: {img.status} {content[:100]!r}")


async def one_request(client: aiohttp.ClientSession, body: dict[str, Any], first_event: str
                      ) -> Sample:
    """Submit, follow the event stream to `done`, download the image (the grid of a
    several-image request)."""
    t0 = time.perf_counter()
    async with client.post("/v1/generations", json=body) as r:
        if r.status != 202:
            raise BenchError(f"POST /v1/generations: {r.status} {(await r.text())[:300]}")
        job_id = (await r.json())["id"]
    submit = time.perf_counter() - t0
    first = done = None
    events = 0
    async for event, _ in job_events(client, job_id):
        events += 1
        if event == first_event and first is None:
            first = time.perf_counter() - t0
        elif event == "done":
            done = time.perf_counter() - t0
    if done is None:
        raise BenchError(f"job {job_id}: the event stream ended without `done`")
    await fetch_result(client, job_id, body["num_images"])
    total = time.perf_counter() - t0
    return Sample(first_frame=first if first is not None else total, done=total,
                  submit=submit, events=events)


async def stack_load(url: str, clients: int, specs: list[GenerationSpec], first_event: str,
                     conditioned: Conditioned | None = None) -> tuple[float, list[Sample]]:
    """Closed loop: `clients` tasks, each starting its next request when one ends."""
    todo = deque(conditioned.bodies(specs) if conditioned else map(request_body, specs))
    samples: list[Sample] = []
    # Idle connections are dropped after CLIENT_KEEPALIVE_S, well before the server drops
    # them (uvicorn: 5 s): reusing one the server is closing is what failed with a read
    # error (connection reset) at 64+ clients, when the pool kept them as long as uvicorn.
    connector = aiohttp.TCPConnector(limit=clients + 4, keepalive_timeout=CLIENT_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=600.0, connect=30.0)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout,
                                     read_bufsize=2**20) as client:

        async def loop() -> None:
            while todo:
                samples.append(await one_request(client, todo.popleft(), first_event))

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return time.perf_counter() - t0, samples


def scrape(metrics_url: str) -> dict[str, float]:
    """The worker's Prometheus counters this benchmark reads (summed over labels)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ddpm_worker_(?:unet_forward_seconds|batch_occupancy)_(?:sum|count))"
                     r"(?:\{[^}]*\})? (\S+)$", line)
        if m:
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


def redis_calls(r: redis.Redis) -> dict[str, int]:
    """Commands Redis has run so far, by command (INFO commandstats)."""
    stats: dict[str, dict[str, int]] = r.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


def redis_reads(r: redis.Redis) -> int:
    """Reads Redis has served so far (INFO stats): one per round trip of a client, however
    many commands it carried (a round trip costs Redis ~20 µs of CPU, mostly the kernel's;
    BENCHMARKS.md §16)."""
    return int(r.info("stats")["total_reads_processed"])  # type: ignore[index]


def run_stack(url: str, clients: int, specs: list[GenerationSpec], max_batch: int,
              first_event: str, procs: Mapping[str, int], r: redis.Redis,
              metrics_url: str, conditioned: Conditioned | None = None) -> Run:
    keys = int(r.dbsize())  # type: ignore[arg-type]
    reads0 = redis_reads(r)
    calls0 = redis_calls(r)
    m0 = scrape(metrics_url)
    before = {k: cpu_seconds(pid) for k, pid in procs.items()}
    client0 = time.process_time()
    seconds, samples = run_async(stack_load(url, clients, specs, first_event, conditioned))
    client = time.process_time() - client0
    after = {k: cpu_seconds(pid) for k, pid in procs.items()}
    n = sum(s.num_images for s in specs)
    cpu = {k: (after[k] - b) * 1e3 / n for k, b in before.items()  # type: ignore[operator]
           if b is not None and after[k] is not None}
    cpu["client"] = client * 1e3 / n
    m1 = scrape(metrics_url)
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
    steps = int(d.get("ddpm_worker_batch_occupancy_count", 0))
    stats = EngineStats(steps=steps,
                        occupancy=d.get("ddpm_worker_batch_occupancy_sum", 0) / max(steps, 1),
                        forward_s=d.get("ddpm_worker_unet_forward_seconds_sum", 0))
    calls1 = redis_calls(r)
    reads = (redis_reads(r) - reads0) / n
    by_command = {k: (v - calls0.get(k, 0)) / n for k, v in calls1.items()
                  if k != "info" and v > calls0.get(k, 0)}
    by_command = dict(sorted(by_command.items(), key=lambda kv: -kv[1]))
    return Run("stack", max_batch, clients, n, seconds, samples, cpu, keys,
               sum(by_command.values()), by_command, reads, stats, specs[0].num_images)


# -- the raw engine ------------------------------------------------------------------------


def run_raw(models: Mapping[str, LoadedModel], device: torch.device, max_batch: int,
            clients: int, specs: list[GenerationSpec], first_event: str) -> Run:
    """The engine as the worker's loop drives it (admit while it has room, step, collect
    frames), with `clients` requests outstanding; no Redis, no PNGs, no HTTP."""
    ws = WorkerSettings()     # the same DDPM_* speed knobs the worker process reads
    engine = Engine(models, device=device, max_batch=max_batch, bf16=ws.autocast_bf16,
                    channels_last=ws.channels_last)
    todo = deque((str(i), s) for i, s in enumerate(specs))
    queued: deque[tuple[str, GenerationSpec]] = deque()
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    samples: list[Sample] = []
    steps, slots, forward = 0, 0, 0.0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    while todo or queued or engine.jobs:
        now = time.perf_counter()
        while todo and len(submitted) < clients:
            job_id, spec = todo.popleft()
            submitted[job_id] = now
            queued.append((job_id, spec))
        while queued and engine.has_room():
            engine.admit(*queued.popleft())
        report = engine.step()
        now = time.perf_counter()
        steps += 1
        slots += sum(report.slots.values())
        forward += sum(report.forward_seconds.values())
        if first_event == "snapshot":
            hit = [f.job_id for f in report.frames if not f.final]
        else:
            hit = report.progressed
        for job_id in hit:
            first.setdefault(job_id, now - submitted[job_id])
        for job_id in report.completed:
            t = now - submitted.pop(job_id)
            samples.append(Sample(first_frame=first.pop(job_id, t), done=t))
    seconds = time.perf_counter() - t0
    cpu = {"engine": (time.process_time() - cpu0) * 1e3 / len(specs)}
    stats = EngineStats(steps=steps, occupancy=slots / max(steps, 1) / max_batch,
                        forward_s=forward)
    return Run("raw", max_batch, clients, len(specs), seconds, samples, cpu, engine=stats)


def run_sampler(model: LoadedModel, device: torch.device, max_batch: int,
                specs: list[GenerationSpec]) -> Run:
    """The ceiling: `models.sample` in this process over the same images in batches of
    `max_batch` (see `sample_in_process`)."""
    seconds, cpu, images = sample_in_process(model, device, max_batch, specs)
    return Run("sampler", max_batch, 1, images, seconds, [], {"sampler": cpu * 1e3 / images},
               request_images=min(max_batch, images))


# -- processes -----------------------------------------------------------------------------


def start_worker(redis_url: str, models_dir: Path, device: str, max_batch: int,
                 log_dir: Path, log_level: str, threads: int) -> tuple[Child, str]:
    """`ddpm worker` at this max batch, once it advertises its models; (process, URL of
    its Prometheus metrics)."""
    port = free_port()
    name = f"bench-{max_batch}-{time.monotonic_ns() % 10**9}"
    env = {"DDPM_LOG_LEVEL": log_level, "DDPM_GRACE_PERIOD": "2"}
    if threads:
        env |= {"DDPM_TORCH_THREADS": str(threads)}
    worker = Child(f"worker-mb{max_batch}", [
        sys.executable, "-m", "ddpm", "worker", "--redis-url", redis_url,
        "--models-dir", str(models_dir), "--device", device, "--max-batch", str(max_batch),
        "--name", name, "--metrics-port", str(port)], log_dir, env)
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while not r.exists(worker_key(name)):
        worker.check()
        if time.monotonic() > deadline:
            worker.stop()
            raise SystemExit(f"the worker did not start:\n{worker.tail()}")
        time.sleep(0.1)
    return worker, f"http://127.0.0.1:{port}/metrics"


# -- output --------------------------------------------------------------------------------


def print_tables(runs: dict[tuple[str, int, int], Run], clients: list[int],
                 batches: list[int]) -> None:
    """A table per concurrency: stack and raw at each max batch."""
    cpu_cols = ("worker", "api", "redis", "client", "engine")
    m = batches[0]
    for n in clients:
        sat = "saturated: clients ≥ max batch" if n >= m else "below saturation"
        print(f"\n{n} clients ({sat})")
        print(f"{'':20} {'img/s':>7} {'vs raw':>6} {'first frame ms':>15} {'done ms':>15} "
              f"{'occup.':>6} {'fwd':>4} {'other':>6} {'redis':>6}   CPU ms/image")
        print(f"{'':20} {'':7} {'':6} {'p50':>7} {'p99':>7} {'p50':>7} {'p99':>7} "
              f"{'':6} {'%':>4} {'ms/st':>6} {'cmd/im':>6}   "
              + " ".join(f"{c:>6}" for c in cpu_cols))
        for mb in batches:
            raw = runs[("raw", mb, n)]
            for side in ("stack", "raw"):
                run = runs[(side, mb, n)]
                ratio = f"{run.images_per_s / raw.images_per_s:5.2f}x" if side == "stack" \
                    else f"{'':6}"
                e = run.engine
                eng = (f"{e.occupancy:6.2f} {100 * e.share(run.seconds):4.0f} "
                       f"{e.other_ms_per_step(run.seconds):6.1f}") if e else f"{'':18}"
                eng += f" {run.redis_commands:6.0f}" if side == "stack" else f" {'-':>6}"
                cpu = " ".join(f"{run.cpu_ms[c]:6.1f}" if c in run.cpu_ms else f"{'-':>6}"
                               for c in cpu_cols)
                lat = " ".join(f"{run.pct(w, q):7.0f}" for w in ("first_frame", "done")
                               for q in (50, 99))
                print(f"{side + ', max batch ' + str(mb):20} {run.images_per_s:7.2f} {ratio} "
                      f"{lat} {eng}   {cpu}")
        if len(batches) > 1:
            gain = {side: runs[(side, m, n)].images_per_s / runs[(side, 1, n)].images_per_s
                    for side in ("stack", "raw")}
            print(f"continuous batching (max batch {m} vs 1): stack {gain['stack']:.2f}x, "
                  f"raw engine {gain['raw']:.2f}x")
    print("\noccup. = mean active slots / max batch per step; fwd % = share of the wall time "
          "in the batched forward (host time);\nother = loop time per step outside the "
          "forward (admission, events, Redis round-trips, waiting for work);\n"
          "redis cmd/im = commands Redis ran per image (API, worker and RQ together); "
          "rt/im (below) = its round trips (reads) per image")


def print_ceiling(runs: dict[tuple[str, int, int], Run], ceiling: list[Run], m: int,
                  clients: list[int]) -> None:
    """Every stack run at max batch `m` against the raw sampler: images/s, and the CPU per
    image of the serving processes (API + worker + Redis) against the sampler's."""
    raw = ceiling[0]
    rows = [("raw sampler, batches of " + str(m), raw)]
    rows += [(f"1-image requests, {n} clients", runs[("stack", m, n)]) for n in clients]
    rows += [(f"{run.request_images}-image requests, {run.clients} clients", run)
             for run in ceiling[1:]]
    cols = ("worker", "api", "redis", "client")
    print(f"\nagainst the raw sampler (max batch {m}): server CPU = API + worker + Redis")
    print(f"{'':32} {'img/s':>8} {'vs raw':>6} {'server':>7} {'raw/':>6} {'redis':>6} "
          f"{'redis':>6}   CPU ms/image")
    print(f"{'':32} {'':8} {'':6} {'ms/im':>7} {'server':>6} {'cmd/im':>6} {'rt/im':>6}   "
          + " ".join(f"{c:>6}" for c in cols))
    for name, run in rows:
        stack = run.side != "sampler"
        ratio = run.images_per_s / raw.images_per_s
        cpu_ratio = raw.server_cpu_ms / run.server_cpu_ms if run.server_cpu_ms else 0.0
        redis_cmds = (f"{run.redis_commands:6.0f} {run.redis_round_trips:6.1f}" if stack
                      else f"{'-':>6} {'-':>6}")
        cpu = " ".join(f"{run.cpu_ms[c]:6.1f}" if c in run.cpu_ms else f"{'-':>6}"
                       for c in cols)
        print(f"{name:32} {run.images_per_s:8.2f} {ratio:5.2f}x {run.server_cpu_ms:7.2f} "
              f"{cpu_ratio:5.2f}x {redis_cmds}   {cpu}")


# -- main ----------------------------------------------------------------------------------

MICRO = "micro"


def micro_config() -> ModelConfig:
    """The null preset's shape (8x8 grey, ch 8, one level, one block, no attention) as a
    real UNet, ~10.6k parameters: a small model whose forward still costs something, where
    the service's per-job host work shows against the model's own (issue 25's model)."""
    null = preset("null")
    return replace(null, unet=replace(null.unet, arch="ddpm"))



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--preset", default="tiny", choices=[*sorted(PRESETS), MICRO],
                   help="random-weight model of this preset (null: a forward of ~zero cost; "
                   f"{MICRO}: the null preset's 8x8 grey shape as a real ~10k-parameter UNet)")
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead")
    p.add_argument("--clients", default="1,16,32", help="concurrencies, comma-separated")
    p.add_argument("--images", type=int, default=48, help="images (requests) per run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--snapshot-every", type=int, default=5,
                   help="frames every k steps (0: none; first frame = first progress event)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--big", type=int, default=0,
                   help="also K-image requests (download: the grid) at the first max batch, "
                        "--images in all; 0: none")
    p.add_argument("--big-clients", type=int, default=2, help="concurrent K-image requests")
    p.add_argument("--skip-batch1", action="store_true", help="do not repeat at --max-batch 1")
    p.add_argument("--repeats", type=int, default=1, help="best (images/s) of this many runs")
    p.add_argument("--threads", type=int, default=int(worker_torch_threads()),
                   help="torch CPU threads of the engine and the worker (default: what "
                   "`ddpm serve` gives its worker, DDPM_TORCH_THREADS or half the CPUs; "
                   "0: torch's own default, one per core)")
    p.add_argument("--prefill-keys", type=int, default=0,
                   help="first fill Redis with this many unrelated keys (a finished job leaves "
                        "about 4 for DDPM_RESULT_TTL, a day by default)")
    p.add_argument("--conditioned", type=float, default=0.0,
                   help="fraction of the stack's 1-image requests that carry an input image "
                   "(img2img and inpainting, alternately); the raw peers stay plain")
    p.add_argument("--redis-profile", action="store_true",
                   help="after each concurrency's runs, one more with every Redis command "
                   "timed (bench/redis_profile.py): Redis's time by command and by script")
    p.add_argument("--log-level", default="WARNING", help="of the worker and the API")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    stop_on_sigterm()
    clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    if not clients or min(clients) < 1 or args.images < 1 or args.big < 0 or args.big_clients < 1:
        p.error("--clients, --images and --big-clients must be positive, --big >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batches = [args.max_batch] + ([] if args.skip_batch1 or args.max_batch == 1 else [1])
    first_event = "snapshot" if args.snapshot_every else "progress"
    runs: dict[tuple[str, int, int], Run] = {}
    ceiling: list[Run] = []              # the raw sampler, then the K-image stack run

    def keep_best(key: tuple[str, int, int], run: Run) -> None:
        if key not in runs or run.images_per_s > runs[key].images_per_s:
            runs[key] = run

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-service-")))
        if args.checkpoint:
            models_dir, model = args.checkpoint, args.checkpoint.resolve().name
            label = f"checkpoint {args.checkpoint}"
        else:
            models_dir, model = tmp / "models", "bench"
            cfg = micro_config() if args.preset == MICRO else preset(args.preset)
            init_checkpoint(models_dir / model, cfg)
            label = f"preset {args.preset}, random weights"
        try:
            loaded = load_models(models_dir, device, [model]).loaded
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"cannot load {models_dir}: {e}") from None
        if model not in loaded:
            raise SystemExit(f"model {model} did not load from {models_dir}")
        params = loaded[model].info.parameters
        info = loaded[model].info
        conditioned = Conditioned.make(args.conditioned, info.image_size, info.in_channels) \
            if args.conditioned else None

        def specs(n: int, base: int, size: int = 1) -> list[GenerationSpec]:
            """Requests of `size` images each, `n` images in all."""
            return [GenerationSpec(model=model, num_images=size, steps=args.steps,
                                   sampler=args.sampler, seed=base + i,
                                   snapshot_every=args.snapshot_every)
                    for i in range(max(n // size, 1))]

        srv = stack.enter_context(RedisServer())
        r = redis.Redis.from_url(srv.url)
        prefill(r, args.prefill_keys)
        # One caller (this process) holds a stream per client: lift the per-caller cap
        # (429 past it) for the run, or it, not the service, would bound the concurrency.
        streams = str(max(64, 2 * max([*clients, args.big_clients])))
        api, url = start_api(srv.url, tmp, args.log_level,
                             {"DDPM_MAX_STREAMS_PER_CALLER": streams,
                              "DDPM_MAX_STREAMS": str(max(1000, int(streams)))})
        stack.callback(api.stop)
        for mb in batches:
            worker, metrics_url = start_worker(srv.url, models_dir, args.device, mb, tmp,
                                               args.log_level, args.threads)
            try:
                assert srv.proc is not None
                procs = {"worker": worker.pid, "api": api.pid, "redis": srv.proc.pid}
                if mb == batches[0]:
                    ceiling[:] = []
                    run_sampler(loaded[model], device, mb, specs(mb, 10**6))     # warm-up
                    for rep in range(args.repeats):
                        keep_best(("sampler", mb, 1), run_sampler(
                            loaded[model], device, mb, specs(args.images, rep * args.images)))
                    ceiling.append(runs[("sampler", mb, 1)])
                    if args.big:
                        run_stack(url, args.big_clients, specs(args.big * args.big_clients,
                                  10**6, args.big), mb, first_event, procs, r, metrics_url)
                        for rep in range(args.repeats):
                            keep_best(("big", mb, args.big_clients), run_stack(
                                url, args.big_clients, specs(args.images, rep * args.images,
                                                             args.big),
                                mb, first_event, procs, r, metrics_url))
                        ceiling.append(runs[("big", mb, args.big_clients)])
                for n in clients:
                    # Warm-up at this concurrency: the batch shapes it makes (CPU kernels
                    # and CUDA caches are set up per shape), the connections, the caches.
                    warm = specs(max(min(n, mb) * 2, 8), 10**6)
                    run_stack(url, n, warm, mb, first_event, procs, r, metrics_url,
                              conditioned)
                    run_raw(loaded, device, mb, n, warm, first_event)
                    for rep in range(args.repeats):
                        batch = specs(args.images, rep * args.images)
                        for run in (run_stack(url, n, batch, mb, first_event, procs, r,
                                              metrics_url, conditioned),
                                    run_raw(loaded, device, mb, n, batch, first_event)):
                            keep_best((run.side, mb, n), run)
                    if args.redis_profile:      # a run of its own: SLOWLOG slows Redis
                        probe = RedisProfile(r)
                        probe.start()
                        run = run_stack(url, n, specs(args.images, 10**7), mb, first_event,
                                        procs, r, metrics_url, conditioned)
                        found = probe.stop()
                        print(f"Redis's time by command and script (SLOWLOG), {n} clients, "
                              f"max batch {mb}:\n{table(found, run.images, probe.truncated)}",
                              flush=True)
                    s, w = runs[("stack", mb, n)], runs[("raw", mb, n)]
                    print(f"  max batch {mb}, {n} clients: stack {s.images_per_s:.2f} img/s, "
                          f"raw {w.images_per_s:.2f} img/s", file=sys.stderr, flush=True)
                worker.check()
                api.check()
            except (BenchError, aiohttp.ClientError) as e:
                raise SystemExit(f"{e}\n--- worker log ---\n{worker.tail()}\n"
                                 f"--- api log ---\n{api.tail()}") from None
            finally:
                worker.stop(timeout=20)

    v = versions()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, torch threads {torch.get_num_threads()}"
    print(f"Service efficiency: {', '.join(f'{k} {x}' for k, x in v.items())}")
    print(f"device {device} ({dev}); model {model} ({label}, {params / 1e6:.2f}M parameters)")
    if conditioned:
        print(f"{args.conditioned:.0%} of the stack's requests image-conditioned (img2img at "
              "0.8 and inpainting, alternately; base64 PNGs in the JSON body)")
    print(f"{args.images} 1-image requests per run, {args.steps} steps {args.sampler}, "
          f"snapshot every {args.snapshot_every}, max batch {args.max_batch}, best of "
          f"{args.repeats}, {args.prefill_keys} keys prefilled;\nfirst frame = first "
          f"`{first_event}` event; done = `done` + PNG downloaded")
    print("stack = HTTP client → ddpm api → Redis → ddpm worker, all on this machine "
          "(CPU per image of each process below); raw = Engine in-process")
    print_tables(runs, clients, batches)
    print_ceiling(runs, ceiling, batches[0], clients)
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "service", "versions": v, "device": str(device), "device_name": dev,
            "model": model, "parameters": params,
            "settings": {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()},
            "runs": [run.summary() for run in runs.values()],
            "vs_sampler": [{"side": run.side, "clients": run.clients,
                            "request_images": run.request_images,
                            "images_per_s_vs_sampler": run.images_per_s / ceiling[0].images_per_s,
                            "sampler_cpu_per_server_cpu":
                                ceiling[0].server_cpu_ms / run.server_cpu_ms}
                           for run in [*ceiling, *(runs[("stack", batches[0], n)]
                                                    for n in clients)]],
        }, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
