"""Per-preset training defaults: the paper's for `cifar10`, shorter runs for the small ones."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainDefaults:
    steps: int
    batch_size: int
    lr: float
    warmup: int          # linear learning-rate warm-up, in steps
    grad_clip: float     # max global gradient norm (0 = off)
    ema_decay: float
    hflip: bool          # random horizontal flips (not for digits or text)
    save_every: int
    sample_every: int


# Ho et al. 2020, appendix B: Adam 2e-4, batch 128, warm-up 5000, clip 1.0, EMA 0.9999,
# random flips; 800k steps for CIFAR-10.
PAPER = TrainDefaults(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0,
                      ema_decay=0.9999, hflip=True, save_every=10_000, sample_every=10_000)

TRAIN_DEFAULTS: dict[str, TrainDefaults] = {
    "cifar10": PAPER,
    "celebahq256": PAPER,
    "lsun256": PAPER,
    # A 1.6M-parameter digit model learns fast: a higher rate, a short warm-up, and an EMA
    # whose horizon (~1000 steps) fits a run of a few thousand steps.
    "mnist": TrainDefaults(steps=5000, batch_size=64, lr=1e-3, warmup=200, grad_clip=1.0,
                           ema_decay=0.999, hflip=False, save_every=500, sample_every=500),
    "tiny": TrainDefaults(steps=200, batch_size=16, lr=1e-3, warmup=0, grad_clip=1.0,
                          ema_decay=0.99, hflip=True, save_every=100, sample_every=100),
}
