"""A network of ~zero cost for benchmarks: ε̂ = w·x_t, one parameter and one multiply.

It is a real model everywhere else (a checkpoint, the samplers, the worker serve it like
any other), so a benchmark run with it measures what the serving stack itself costs per
image: the ceiling that a GPU fast enough to make the UNet free would leave.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import UNetConfig


class NullNet(nn.Module):
    """ε̂_θ(x_t, t[, y]) = w·x_t; t and y are ignored.

    w starts at 1: ε̂ = x_t is the exact ε of pure noise (t = T), and for every ᾱ in (0, 1]
    the implied x̂0 = x_t·(1 − √(1−ᾱ))/√ᾱ is no larger than x_t, so every sampler's
    trajectory stays finite (and the images are plain, not noise)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return x * self.w
