"""What admitting one 1-image job costs the worker's loop, against a step of the batch it
joins, both measured here in the same run: `Engine.admit` and the `SlotBatch.add` that
gives it its slot (plans, start noise, bookkeeping), then its removal (`cancel`, the same
`keep` a finished job costs), beside N running 1-image jobs of the micro UNet (the
issue-25 model: 10,593 parameters, 8×8), on one torch thread. Then the forward alone per
image over a job's steps at the rows per step a service of 1-image jobs reaches, against
full batches of 64. Per-job host work and occupancy are what set the worker's CPU per
image of 1-image jobs apart from that of one big job (BENCHMARKS.md §17).
Not a test: nothing here asserts a speed.

    python -m bench.admit_cost                   # beside 34 running jobs
    python -m bench.admit_cost --running 8 --repeats 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.service import micro_config
from contract.spec import GenerationSpec
from models import init_checkpoint
from worker.catalog import load_models
from worker.engine import Engine


def cpu_us(fn: Callable[[], object], n: int) -> float:
    """Best of 3 rounds of `n` calls: CPU µs per call."""
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--running", type=int, default=34, help="1-image jobs already in the batch")
    p.add_argument("--repeats", type=int, default=300, help="admissions per round")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        init_checkpoint(Path(tmp) / "micro", micro_config())
        catalog = load_models(Path(tmp), torch.device("cpu"), ["micro"])

    def spec(seed: int, steps: int = args.steps) -> GenerationSpec:
        return GenerationSpec(model="micro", steps=steps, sampler="ddim", seed=seed)

    def engine(steps: int) -> Engine:
        e = Engine(catalog.loaded, device="cpu", max_batch=args.running + 1)
        for i in range(args.running):
            e.admit(f"running-{i}", spec(i, steps))
        e.step()
        return e

    joined = engine(args.steps)
    count = iter(range(10**9))

    def admit_one() -> None:
        job = f"new-{next(count)}"
        joined.admit(job, spec(10**6))
        joined._fill()          # the slot it gets at the next step
        joined.cancel(job)

    admit = cpu_us(admit_one, args.repeats)
    step = cpu_us(engine(1000).step, 50)    # jobs that do not end while timed
    print(f"micro UNet, {args.running} running 1-image jobs, {args.steps} DDIM steps, "
          f"torch {torch.__version__}, 1 thread")
    print(f"admit one 1-image job (admit + its slot + its removal): {admit:8.1f} µs CPU")
    print(f"one step of the batch (peer):                          {step:8.1f} µs CPU")
    print(f"admission / step: {admit / step:.2f}; per image of the job, the admission is "
          f"{admit / (step * args.steps / (args.running + 1)):.2f}× its share of the steps")
    # The forward alone per image over a job's steps at the rows a step carries: what the
    # occupancy of 1-image jobs costs against full batches, whatever the host work.
    u = catalog.loaded["micro"].checkpoint
    net, cfg = u.net, u.config.unet
    full = 0.0
    print(f"forward CPU per image over {args.steps} steps, by rows per step "
          "(vs 64 rows):")
    for rows in (64, 48, 40, 32, 24, 16):
        x = torch.randn(rows, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.randint(0, 1000, (rows,))
        with torch.inference_mode():
            per = cpu_us(lambda x=x, t=t: net(x, t), 50) * args.steps / rows
        full = full or per
        print(f"  {rows:3d} rows: {per / 1e3:6.3f} ms  ({per / full:.2f}×)")


if __name__ == "__main__":
    main()
