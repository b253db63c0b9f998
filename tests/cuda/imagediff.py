"""How far apart two runs' final images may be, in 8-bit levels, and the helpers that make
those images through the worker's public API (Engine) for the `cuda` tests.

The tolerances, stated once:

- `BF16` (bf16 autocast vs fp32): mean |Δ| ≤ 2 levels and at most 2% of pixels more than
  16 levels off. bf16 keeps 8 bits of mantissa, so ε differs by ~0.4% and the difference
  grows along a trajectory; a pixel near a decision edge of a trained model can flip
  (single pixels 100+ levels off were seen), so the bound is on the mean and on the share
  of far-off pixels, not on the max. Measured with CPU bf16 autocast on the trained MNIST
  checkpoint and on cifar10-shaped random weights (20 steps, DDIM/DPM-Solver++/DDPM):
  mean 0.2–0.8 levels, 0.2–0.6% of pixels over 16 levels off.
- `FP32` (the same precision, other kernels: channels-last vs contiguous, the forward in
  chunks vs whole, CUDA vs CPU): max |Δ| ≤ 4 levels and mean ≤ 0.05. On the CPU the first
  two are bit-identical (MNIST, 16 images, 20 steps); on a GPU cuDNN may pick other
  algorithms per layout and batch size, which differ in float rounding only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from contract.spec import GenerationSpec
from models import Checkpoint, ModelConfig, Schedule, UNet, load_checkpoint, preset
from worker.engine import Engine, LoadedModel

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "checkpoints" / "mnist"


@dataclass(frozen=True)
class Tolerance:
    mean: float                 # mean |Δ|, levels
    far: int                    # a pixel more than this many levels off is "far"
    far_share: float            # at most this share of pixels far off
    max: int | None = None      # and none more than this off (None: not bounded)


BF16 = Tolerance(mean=2.0, far=16, far_share=0.02)
FP32 = Tolerance(mean=0.05, far=4, far_share=0.0, max=4)


@dataclass(frozen=True)
class Diff:
    mean: float
    max: int
    far_share: float

    def __str__(self) -> str:
        return f"mean |Δ| {self.mean:.3f} levels, max {self.max}, far share {self.far_share:.4f}"


def diff(a: Tensor, b: Tensor, tol: Tolerance) -> Diff:
    """Differences of two uint8 image stacks of one shape."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    d = (a.int() - b.int()).abs().float()
    return Diff(float(d.mean()), int(d.max()), float((d > tol.far).float().mean()))


def assert_within(a: Tensor, b: Tensor, tol: Tolerance, what: str) -> Diff:
    """Fail naming `what` and every figure when `a` and `b` are further apart than `tol`."""
    d = diff(a, b, tol)
    ok = d.mean <= tol.mean and d.far_share <= tol.far_share \
        and (tol.max is None or d.max <= tol.max)
    assert ok, f"{what}: {d}; allowed {tol}"
    return d


def random_model(name: str, preset_name: str, device: torch.device | str, seed: int = 0
                 ) -> LoadedModel:
    """A resident model of a preset's architecture with seeded random weights."""
    torch.manual_seed(seed)
    cfg: ModelConfig = preset(preset_name)
    net = UNet(cfg.unet).to(device).eval()
    ck = Checkpoint(net=net, config=cfg, schedule=Schedule.from_config(cfg.diffusion),
                    path=Path("."))
    return LoadedModel.from_checkpoint(name, ck, 0.0)


def mnist_model(device: torch.device | str) -> LoadedModel:
    """The trained default model, as the worker loads it."""
    return LoadedModel.from_checkpoint("mnist", load_checkpoint(MNIST, device=device), 0.0)


def final_images(engine: Engine, specs: Iterable[tuple[str, GenerationSpec]],
                 max_steps: int = 10_000) -> dict[tuple[str, int], Tensor]:
    """Admit every (job id, spec), step until each image's final frame: (job, index) →
    `[H x W x C]` uint8. Counts frames, so it reads nothing of the engine but its reports."""
    want = 0
    for job_id, spec in specs:
        engine.admit(job_id, spec)
        want += spec.num_images
    finals: dict[tuple[str, int], Tensor] = {}
    for _ in range(max_steps):
        if len(finals) == want:
            return finals
        for f in engine.step().frames:
            if f.final:
                assert (f.job_id, f.index) not in finals, "two final frames for one image"
                finals[f.job_id, f.index] = f.pixels.cpu()
    raise AssertionError(f"{want - len(finals)} images unfinished after {max_steps} steps")


def stacked(finals: dict[tuple[str, int], Tensor]) -> Tensor:
    return torch.stack([finals[k] for k in sorted(finals)])
