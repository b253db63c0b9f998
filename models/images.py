"""Model space ([-1, 1]) to 8-bit pixels, and 8-bit pixels to PNG."""

from __future__ import annotations

import io
import math
import os

import numpy as np
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


def png_bytes(pixels: Tensor | np.ndarray, compress_level: int = 6) -> bytes:
    """One `[H x W x C]` uint8 image as PNG: C = 1 is greyscale ("L"), C = 3 RGB. The one
    place pixels become a PNG: the worker's frames and images, `ddpm sample`'s files and
    the training grids. Pillow is imported here, not with models."""
    from PIL import Image

    arr = pixels.detach().cpu().numpy() if isinstance(pixels, Tensor) else np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.dtype != np.uint8:
        raise ValueError(f"expected [H x W x 1|3] uint8 pixels, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(
        buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png(pixels: Tensor | np.ndarray, file: str | os.PathLike[str]) -> None:
    """Write `png_bytes(pixels)` to `file`."""
    with open(file, "wb") as f:
        f.write(png_bytes(pixels))
