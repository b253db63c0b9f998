"""Worker throughput: many concurrent 1-image jobs vs. one big job vs. `--max-batch 1`,
and all of them against the raw sampler.

Every scenario runs the real worker (RQ, Redis, PNG encoding, events) in this process
against an embedded Redis, on the same model, in the same run, and the output is ratios
between them. The last row is the ceiling: `models.sample` in this process on the same
images in batches of --max-batch, no worker at all. With `--preset null` (a forward of ~zero
cost) the ratios are the worker's own host cost per job and per image. Not a test: nothing
here asserts a speed.

    python -m bench.worker_throughput                      # tiny preset, CPU
    python -m bench.worker_throughput --preset null --max-batch 64 --images 256 \\
        --steps 20 --sampler ddim                          # the worker's own ceiling
    python -m bench.worker_throughput --preset cifar10 --device cuda --images 256 --steps 50
    python -m bench.worker_throughput --checkpoint checkpoints/mnist
    python bench/worker_throughput.py                      # as a script, the same
    python -m bench.worker_throughput --preset null --max-batch 64 --images 1024 \
        --steps 20 --sampler ddim --repeats 1 --profile 40  # where the worker's CPU goes
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
import torch

from contract.queueing import enqueue, fetch_job
from contract.spec import GenerationSpec
from ddpm.redis_server import RedisServer
from models import PRESETS, SlotSpec, init_checkpoint, preset, sample, sampler_kind, to_uint8
from worker.catalog import load_models
from worker.engine import LoadedModel
from worker.main import build_worker
from worker.settings import WorkerSettings


def scenario(url: str, models: Path, name: str, specs: list[GenerationSpec],
             max_batch: int, device: str, profile: int = 0,
             profile_out: Path | None = None) -> tuple[float, float]:
    """(wall seconds from the first enqueue, CPU seconds of this process after the
    enqueues: the worker's threads, not the Redis server's) until the worker has
    finished every job. `profile`: print the top this many functions (own CPU time) of
    every thread of the worker (`ThreadProfiles`); `profile_out`: also dump their stats
    there (pstats format)."""
    r = redis.Redis.from_url(url)
    r.flushall()
    worker = build_worker(WorkerSettings(redis_url=url, models_dir=models, device=device,
                                         max_batch=max_batch, log_level="WARNING"))
    t0 = time.perf_counter()
    jobs = [enqueue(r, s) for s in specs]
    cpu0 = time.process_time()      # the worker's, not the enqueues'
    if profile:
        with ThreadProfiles() as profiles:
            profiles.main.runcall(worker.work, burst=True, logging_level="WARNING")
        stats = profiles.stats()
        print(f"-- {name}: the top {profile} functions by own CPU time, all the worker's "
              f"threads ({profiles.threads} profiled; the profiler's own cost included) --")
        stats.sort_stats("tottime").print_stats(profile)
        if profile_out is not None:
            stats.dump_stats(profile_out)
    else:
        worker.work(burst=True, logging_level="WARNING")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    bad = [j.id for j in jobs if fetch_job(r, j.id).get_status() != "finished"]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} jobs did not finish")
    return seconds, cpu


class ThreadProfiles:
    """cProfile of every thread of the worker, on each thread's own CPU clock: the loop
    (`main`, run by the caller) and every thread started meanwhile (the event writer, its
    encoders, the heartbeat, webhooks, RQ's command listener), each enabling its own
    profile at its first event (`threading.setprofile`). A wall-clock profile of one
    thread charges a function for the time it waited for the GIL held by another; the
    loop thread alone missed the writer's share of a job's cost."""

    def __init__(self) -> None:
        self.main = cProfile.Profile(time.thread_time)
        self._others: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _start(self, frame: Any, event: str, arg: Any) -> None:
        prof = cProfile.Profile(time.thread_time)
        with self._lock:
            self._others.append(prof)
        prof.enable()                   # replaces this hook, on this thread only

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)

    @property
    def threads(self) -> int:
        return 1 + len(self._others)

    def stats(self) -> pstats.Stats:
        """All threads' stats together (those still running are stopped: their profile
        is disabled as stats are made, on whichever thread asks)."""
        with self._lock:
            others = list(self._others)
        stats = pstats.Stats(self.main)
        for prof in others:
            with contextlib.suppress(TypeError):     # a thread that recorded nothing
                stats.add(prof)
        return stats


def sample_in_process(model: LoadedModel, device: torch.device, max_batch: int,
                      specs: list[GenerationSpec]) -> tuple[float, float, int]:
    """The ceiling of any server: `models.sample` in this process over the images of
    `specs` in batches of `max_batch`, to uint8 pixels on the host; no engine bookkeeping,
    no Redis, no PNGs. (wall seconds, CPU seconds of this process, images)."""
    ckpt = model.checkpoint
    d = ckpt.config.diffusion
    slots = [SlotSpec(seed=s.seed, index=i, steps=s.steps, kind=sampler_kind(s.sampler,
                      d.variance_type), eta=s.eta) for s in specs for i in range(s.num_images)]
    bf16 = WorkerSettings().autocast_bf16 and device.type == "cuda"   # as the worker runs it

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return ckpt.net(x, t, y).float()

    cpu0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(slots), max_batch):
            x = sample(net, ckpt.schedule, slots[lo:lo + max_batch], device=device,
                       **ckpt.batch_options)
            to_uint8(x).cpu()
    return time.perf_counter() - t0, time.process_time() - cpu0, len(slots)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="random-weight model of this preset (null: a forward of ~zero cost)")
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=32, help="total images per scenario")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile every thread of the worker in 'many 1-image jobs' (first "
                   "run) on thread CPU clocks, print the top N functions by own time")
    p.add_argument("--profile-out", type=Path, help="with --profile: dump its stats here")
    p.add_argument("--skip-batch1", action="store_true",
                   help="leave out the 'many 1-image jobs, --max-batch 1' scenario")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as srv:
        if args.checkpoint:
            models, model = args.checkpoint, args.checkpoint.resolve().name
        else:
            models, model = Path(tmp), "bench"
            cfg = preset(args.preset)
            init_checkpoint(models / model, cfg)

        def spec(n: int, seed: int) -> GenerationSpec:
            return GenerationSpec(model=model, num_images=n, steps=args.steps,
                                  sampler=args.sampler, seed=seed)

        n = args.images
        runs = {
            "many 1-image jobs": ([spec(1, s) for s in range(n)], args.max_batch),
            "one big job": ([spec(min(n, 64), s) for s in range((n + 63) // 64)],
                            args.max_batch),
        }
        if not args.skip_batch1:
            runs["many 1-image jobs, --max-batch 1"] = ([spec(1, s) for s in range(n)], 1)
        scenario(srv.url, models, "warm-up", [spec(2, 0)], args.max_batch, args.device)
        seconds: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for name, (specs, mb) in runs.items():
            prof = args.profile if name == "many 1-image jobs" else 0
            best = min(scenario(srv.url, models, name, specs, mb, args.device,
                                prof if i == 0 else 0, args.profile_out if i == 0 else None)
                       for i in range(args.repeats))
            seconds[name], cpu[name] = best
            for s, h in saved.items():
                signal.signal(s, h)
        loaded = load_models(models, torch.device(args.device), [model]).loaded[model]
        one = [spec(1, s) for s in range(n)]
        sample_in_process(loaded, torch.device(args.device), args.max_batch, one[:8])  # warm
        raw_name = "raw sampler in-process (no worker)"
        seconds[raw_name], cpu[raw_name] = min(
            sample_in_process(loaded, torch.device(args.device), args.max_batch, one)[:2]
            for _ in range(args.repeats))

    base, raw = seconds["many 1-image jobs"], seconds[raw_name]
    print(f"model {model} ({args.preset if not args.checkpoint else 'checkpoint'}), "
          f"device {args.device}, {n} images x {args.steps} steps {args.sampler}, "
          f"max batch {args.max_batch}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"{'scenario':38} {'seconds':>8} {'images/s':>9} {'vs many 1-image jobs':>21} "
          f"{'vs raw sampler':>15} {'CPU ms/image':>13}")
    for name, s in seconds.items():
        print(f"{name:38} {s:8.2f} {n / s:9.2f} {base / s:20.2f}x {raw / s:14.2f}x "
              f"{cpu[name] * 1e3 / n:13.2f}")
    print(f"worker CPU per image, one big job / many 1-image jobs: "
          f"{cpu['one big job'] / cpu['many 1-image jobs']:.2f}")

if __name__ == "__main__":
    main()
