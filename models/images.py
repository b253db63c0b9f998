"""Model space ([-1, 1]) to 8-bit pixels."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """`[N x C x H x W]` float in [-1, 1] → `[N x H x W x C]` uint8 on the CPU."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) \
        .permute(0, 2, 3, 1).cpu()


def from_uint8(images: Tensor) -> Tensor:
    """uint8 pixels (any layout) → float in model space [-1, 1]; the inverse of `to_uint8`'s
    scaling."""
    return images.float() / 127.5 - 1.0


def make_grid(images: Tensor, ncol: int | None = None, pad: int = 2) -> Tensor:
    """Tile `[N x H x W x C]` uint8 images into one `[H' x W' x C]` image, `ncol` per row."""
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = torch.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = images[i]
    return grid
