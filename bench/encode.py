"""Frame encoding: where should the worker encode snapshot frames — one thread, a pool of
threads or a pool of processes — and what does each preview format cost?

Pillow's PNG (zlib), JPEG (libjpeg) and WebP (libwebp) encoders release the GIL while they
compress, so threads may scale; processes certainly do, but the pixels must be shipped to
them (pickled through a pipe) and the bytes shipped back. This measures both with the
worker's own encoder (`worker.frames.encode_frame`) on frames like the ones the worker
makes: uint8 `[H x W x C]` arrays of x_t-like content (a smooth image plus Gaussian noise at
the noise levels of a sampling run's timesteps, area-downscaled where the preview is smaller
— the worker does that on the device, before the encoder sees the pixels — then clipped):

  - `png256`:  256x256 RGB at full size as PNG (zlib level 1);
  - `jpeg128`, `webp128`: 256x256 frames downscaled to 128x128, as JPEG / WebP (method 0) at
    quality 75 (the contract's default preview for images over 64 px:
    `contract.Preview.default`; `--quality` for others);
  - `png28`:   28x28 grey as PNG (MNIST's frames at full size).

Each format is encoded serially (a plain loop in this thread: the peer), then through
`ThreadPoolExecutor` with 1, 2, 4 workers and `ProcessPoolExecutor` with 2, 4 workers (warm:
started before the clock; every frame's pixels shipped to the process and its bytes back,
as the worker would pay), one frame per task; then 2 threads and 2 processes with 8 frames
per task (`--batched`, `--per-task`: a step's frames split between the workers, which
spreads the per-task cost — it matters for small frames). Every configuration encodes
passes over the same `--frames` distinct frames until `--min-seconds` have passed, in
`--repeats` rounds over everything (best of each); the table gives frames/s and the ratio
to serial, measured in the same run.
A second table gives the cores busy meanwhile: ours (this process and its pool's processes)
and everyone else's (from /proc/stat) — on a shared machine, the check that a ratio means
something. Then the bytes per frame (min / mean / max over the frames) of each format
against the contract's per-frame estimate (`Preview.frame_bytes`, which the stream byte
budget uses).

    python -m bench.encode                                               # ~45 s on 2 cores
    python -m bench.encode --frames 16 --min-seconds 0.2 --repeats 1     # quicker
    python -m bench.encode --formats png256,webp128 --threads 1,2,4,8 --processes 2,4,8
    python -m bench.encode --formats jpeg128,webp128 --quality 90

Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from contract.preview import Preview
from worker.frames import encode_frame

T = 1000                        # the schedule's timesteps (linear β, as the presets)


@dataclass(frozen=True)
class Format:
    """One kind of frame: the model's image (`side`, `channels`) and its preview."""

    name: str
    side: int
    channels: int
    preview: Preview


FORMATS: dict[str, Format] = {
    "png256": Format("png256", 256, 3, Preview(256, "png")),
    "jpeg128": Format("jpeg128", 256, 3, Preview(128, "jpeg", 75)),
    "webp128": Format("webp128", 256, 3, Preview(128, "webp", 75)),
    "png28": Format("png28", 28, 1, Preview(28, "png")),
}


def _encode_job(args: tuple[np.ndarray, Preview]) -> bytes:
    return encode_frame(*args)


def _encode_many(args: tuple[list[np.ndarray], Preview]) -> list[bytes]:
    return [encode_frame(f, args[1]) for f in args[0]]


def make_frames(n: int, side: int, channels: int, out_side: int, seed: int = 0
                ) -> list[np.ndarray]:
    """`n` x_t-like frames: one smooth image x0 (a few random low-frequency waves per
    channel, in [-1, 1]) noised as q(x_t | x0) at `n` timesteps spread over [0, T) of a
    linear β schedule, area-downscaled to `out_side`, clipped, as uint8 (the worker's
    `frame_pixels` then `to_uint8`). Mostly noise, as most of a sampling run is."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    x0 = np.zeros((side, side, channels))
    for c in range(channels):
        for _ in range(4):
            fy, fx = rng.uniform(0.5, 4, 2)
            x0[:, :, c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
    x0 = np.clip(x0 / 2, -1, 1)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    k = side // out_side
    frames = []
    for t in np.linspace(0, T - 1, n).round().astype(int):
        xt = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * rng.standard_normal(x0.shape)
        xt = xt.reshape(out_side, k, out_side, k, channels).mean(axis=(1, 3))
        frames.append(((np.clip(xt, -1, 1) + 1) * 127.5).round().astype(np.uint8))
    return frames


def timed(run: Callable[[list[np.ndarray]], Iterable[bytes]], frames: list[np.ndarray],
          min_seconds: float) -> float:
    """Frames per second: whole passes of `run` over `frames` until `min_seconds` passed."""
    done, t0 = 0, time.perf_counter()
    while True:
        for b in run(frames):
            assert b
        done += len(frames)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def pool_runner(pool: Executor, fmt: Format, per_task: int
                ) -> Callable[[list[np.ndarray]], Iterable[bytes]]:
    """One task per frame (a writer handing frames over one at a time), or `per_task`
    frames per task (a step's frames split between the workers)."""
    if per_task == 1:
        return lambda frames: pool.map(_encode_job, [(f, fmt.preview) for f in frames])

    def run(frames: list[np.ndarray]) -> Iterable[bytes]:
        tasks = [(frames[i:i + per_task], fmt.preview) for i in range(0, len(frames), per_task)]
        return (b for chunk in pool.map(_encode_many, tasks) for b in chunk)
    return run


def warm(pool: Executor, workers: int, fmt: Format, frame: np.ndarray) -> None:
    """Start every worker of `pool` (process start-up and imports are not per frame)."""
    list(pool.map(_encode_job, [(frame, fmt.preview)] * (workers * 4)))


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _pids_cpu_s(pids: Iterable[int]) -> float:
    tck, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tck   # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class CpuShare:
    """Cores busy during a measurement: this process and its pool's processes ("ours"),
    and everything else on the machine ("others": other jobs disturbing the figures)."""

    ours: float = 0.0
    others: float = 0.0


class Probe:
    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = list(pids)

    def __enter__(self) -> Probe:
        self.t0, self.m0 = time.perf_counter(), _machine_busy_s()
        self.c0 = time.process_time() + _pids_cpu_s(self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        ours = time.process_time() + _pids_cpu_s(self.pids) - self.c0
        self.share = CpuShare(ours / wall, max(0.0, _machine_busy_s() - self.m0 - ours) / wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=48,
                   help="distinct frames per format (noise levels spread over the run)")
    p.add_argument("--min-seconds", type=float, default=0.6,
                   help="each configuration encodes whole passes for at least this long")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over every format and configuration; the best of each")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated, of {', '.join(FORMATS)}")
    p.add_argument("--threads", default="1,2,4", help="thread pool sizes")
    p.add_argument("--processes", default="2,4", help="process pool sizes")
    p.add_argument("--batched", default="2",
                   help="pool sizes (threads and processes) also run with --per-task frames "
                        "per task")
    p.add_argument("--per-task", type=int, default=8, help="frames per task when batched")
    p.add_argument("--start-method", default="spawn",
                   choices=multiprocessing.get_all_start_methods(),
                   help="process pools' start method (a worker with torch and threads "
                        "should not fork)")
    p.add_argument("--quality", type=int, default=75, help="of the JPEG and WebP previews")
    args = p.parse_args()
    threads = [int(n) for n in args.threads.split(",") if n]
    procs = [int(n) for n in args.processes.split(",") if n]
    batched = [int(n) for n in args.batched.split(",") if n]
    fmts = [FORMATS[n] for n in args.formats.split(",")]
    fmts = [dataclasses.replace(f, preview=dataclasses.replace(f.preview, quality=args.quality))
            if f.preview.quality else f for f in fmts]
    ctx = multiprocessing.get_context(args.start_method)

    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"Pillow {Image.__version__}; {args.frames} frames per format, passes of "
          f">= {args.min_seconds} s, best of {args.repeats}; processes: {args.start_method}; "
          f"quality {args.quality}")
    t_start = time.perf_counter()
    frames = {f.name: make_frames(args.frames, f.side, f.channels, f.preview.size)
              for f in fmts}
    sizes = {f.name: [len(encode_frame(x, f.preview)) for x in frames[f.name]] for f in fmts}

    pools: dict[str, Executor] = {f"threads {n}": ThreadPoolExecutor(n)
                                  for n in sorted({*threads, *batched})}
    pools |= {f"processes {n}": ProcessPoolExecutor(n, mp_context=ctx)
              for n in sorted({*procs, *batched})}
    # (label, pool, frames per task)
    plan = [("serial", "", 1)] + [(f"threads {n}", f"threads {n}", 1) for n in threads] \
        + [(f"processes {n}", f"processes {n}", 1) for n in procs] \
        + [(f"{k} {n} x{args.per_task}", f"{k} {n}", args.per_task)
           for k in ("threads", "processes") for n in batched]
    configs = [c for c, _, _ in plan]
    rates: dict[str, dict[str, float]] = {f.name: {} for f in fmts}
    cpu: dict[str, dict[str, CpuShare]] = {f.name: {} for f in fmts}
    try:
        for name, pool in pools.items():
            warm(pool, int(name.split()[1]), fmts[0], frames[fmts[0].name][0])
        for _ in range(args.repeats):
            for fmt in fmts:
                fs = frames[fmt.name]
                for c, key, per_task in plan:
                    pool = pools.get(key)
                    run = (pool_runner(pool, fmt, per_task) if pool else
                           lambda xs, fmt=fmt: (encode_frame(x, fmt.preview) for x in xs))
                    pids = list(getattr(pool, "_processes", None) or {})
                    with Probe(pids) as probe:
                        rate = timed(run, fs, args.min_seconds)
                    if rate > rates[fmt.name].get(c, 0.0):
                        rates[fmt.name][c], cpu[fmt.name][c] = rate, probe.share
    finally:
        for pool in pools.values():
            pool.shutdown()
    wall = time.perf_counter() - t_start

    names = list(rates)
    print("\nframes/s (ratio to serial, same run)")
    print(f"{'':18}" + "".join(f"{n:>18}" for n in names))
    print(f"{'serial ms/frame':18}" + "".join(f"{1e3 / rates[n]['serial']:18.3f}"
                                              for n in names))
    for c in configs:
        cells = [f"{rates[n][c]:.0f} ({rates[n][c] / rates[n]['serial']:.2f}x)" for n in names]
        print(f"{c:18}" + "".join(f"{x:>18}" for x in cells))
    print("\ncores busy during the best run of each: ours (this process + its pool) / others")
    print(f"{'':18}" + "".join(f"{n:>18}" for n in names))
    for c in configs:
        print(f"{c:18}" + "".join(
            f"{f'{cpu[n][c].ours:.2f} / {cpu[n][c].others:.2f}':>18}" for n in names))

    print("\nbytes per frame")
    print(f"{'format':10} {'pixels':>14} {'raw bytes':>10} {'min':>8} {'mean':>8} {'max':>8} "
          f"{'max/raw':>8} {'estimate':>9} {'max<=est':>8}")
    for fmt in fmts:
        s = sizes[fmt.name]
        side, c = fmt.preview.size, fmt.channels
        raw = side * side * c
        est = fmt.preview.frame_bytes(c)
        print(f"{fmt.name:10} {f'{side}x{side}x{c}':>14} {raw:10d} {min(s):8d} "
              f"{sum(s) / len(s):8.0f} {max(s):8d} {max(s) / raw:8.3f} {est:9d} "
              f"{'yes' if max(s) <= est else 'NO':>8}")
    load = os.getloadavg()
    print(f"\n{wall:.0f} s; load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
