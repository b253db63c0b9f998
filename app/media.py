"""Pictures made from a job's stored PNGs with Pillow (no torch): a grid of the final
images and an animated GIF of the denoising, one frame per snapshot step."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image

PAD = 2
MIN_CELL = 64        # small images (28 px MNIST) are scaled up so a person can see them
GIF_FRAME_MS = 120
GIF_LAST_MS = 1500   # hold the final images


def _open(png: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(png))
    im.load()
    return im.convert("RGB") if im.mode not in ("L", "RGB") else im


def tile(images: Sequence[Image.Image | None], size: tuple[int, int], mode: str) -> Image.Image:
    """Images (None: not there yet, left dark) in a near-square grid, scaled up if tiny."""
    n = max(1, len(images))
    ncol = max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    scale = max(1, MIN_CELL // max(size))
    w, h = size[0] * scale, size[1] * scale
    grid = Image.new(mode, (ncol * (w + PAD) + PAD, nrow * (h + PAD) + PAD))
    for i, im in enumerate(images):
        if im is None:
            continue
        if scale > 1:
            im = im.resize((w, h), Image.Resampling.NEAREST)
        r, c = divmod(i, ncol)
        grid.paste(im.convert(mode), (PAD + c * (w + PAD), PAD + r * (h + PAD)))
    return grid


def _frame_geometry(pngs: Sequence[Image.Image]) -> tuple[tuple[int, int], str]:
    first = pngs[0]
    return first.size, "L" if all(p.mode == "L" for p in pngs) else "RGB"


def grid_png(pngs: Sequence[bytes]) -> bytes:
    images = [_open(p) for p in pngs]
    size, mode = _frame_geometry(images)
    buf = io.BytesIO()
    tile(images, size, mode).save(buf, format="PNG")
    return buf.getvalue()


def animation_gif(num_images: int, snapshots: Sequence[tuple[int, int, bytes]],
                  finals: Sequence[bytes | None]) -> bytes:
    """`snapshots`: (step, image index, PNG) in stream order. Each frame shows every image
    at its latest snapshot up to that step; the last frame shows the final images."""
    by_step: dict[int, dict[int, Image.Image]] = {}
    for step, index, png in snapshots:
        if 0 <= index < num_images:
            by_step.setdefault(step, {})[index] = _open(png)
    final = {i: _open(p) for i, p in enumerate(finals) if p is not None}
    every = [im for frame in by_step.values() for im in frame.values()] + list(final.values())
    if not every:
        raise ValueError("nothing to animate yet")
    size, mode = _frame_geometry(every)
    latest: list[Image.Image | None] = [None] * num_images
    frames = []
    for step in sorted(by_step):
        for i, im in by_step[step].items():
            latest[i] = im
        frames.append(tile(latest, size, mode))
    if final:
        for i, im in final.items():
            latest[i] = im
        frames.append(tile(latest, size, mode))
    durations = [GIF_FRAME_MS] * (len(frames) - 1) + [GIF_LAST_MS]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                   duration=durations, loop=0)
    return buf.getvalue()
