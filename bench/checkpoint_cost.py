"""What a resume checkpoint costs the step loop: export + encode of every running job's
state (worker/drain.py `Resumer.stepped`), against the step itself, and the bytes it
writes. No Redis: the write goes through the writer thread, off the step loop; the bytes
say what it sends.

    python -m bench.checkpoint_cost                          # tiny and null presets, CPU
    python -m bench.checkpoint_cost --preset cifar10 --device cuda --jobs 64

Per-step cost of checkpointing every N steps = checkpoint time / N.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from contract.resume import state_bytes
from contract.spec import GenerationSpec
from models import PRESETS, init_checkpoint, preset
from worker.catalog import load_models
from worker.engine import Engine
from worker.resume import encode


def measure(preset_name: str, device: str, jobs: int, sampler: str, steps: int,
            repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        init_checkpoint(Path(tmp) / "bench", preset(preset_name))
        loaded = load_models(Path(tmp), torch.device(device), ["bench"]).loaded
        engine = Engine(loaded, device=device, max_batch=jobs)
        info = loaded["bench"].info
        specs = {f"j{k}": GenerationSpec(model="bench", sampler=sampler, steps=steps, seed=k)
                 for k in range(jobs)}
        for job_id, spec in specs.items():
            engine.admit(job_id, spec)
        engine.step()                                   # warm-up: every slot filled
        step_s, ckpt_s, nbytes = [], [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            engine.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            states = engine.exports(list(specs))
            blobs = [encode(states[j], specs[j], info) for j in specs]
            ckpt_s.append(time.perf_counter() - t)
            nbytes = sum(map(len, blobs))
        spec0 = next(iter(specs.values()))
        return {"step_ms": 1e3 * statistics.median(step_s),
                "checkpoint_ms": 1e3 * statistics.median(ckpt_s),
                "bytes": nbytes, "bound_per_job": state_bytes(spec0, info)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="default: tiny and null")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=32, help="running 1-image jobs")
    p.add_argument("--sampler", default="dpm++2m", help="dpm++2m keeps two arrays per image")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    for name in args.preset or ["tiny", "null"]:
        m = measure(name, args.device, args.jobs, args.sampler, args.steps, args.repeats)
        ratio = m["checkpoint_ms"] / m["step_ms"] if m["step_ms"] else float("inf")
        print(f"{name:8s} {args.jobs} jobs {args.sampler}: step {m['step_ms']:.2f} ms, "
              f"checkpoint {m['checkpoint_ms']:.2f} ms ({ratio:.2f} steps), "
              f"{m['bytes'] / 1024:.0f} KiB written; bound per job {m['bound_per_job']} B")


if __name__ == "__main__":
    main()
