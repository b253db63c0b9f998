"""Pictures made from a job's stored images with Pillow (no torch): a grid of the final
images and an animated GIF of the denoising, one frame per snapshot step.

Final images are PNGs at the model's size; snapshot frames are PNG, WebP or JPEG, and may
be smaller (a preview size, `snapshot_size`). Everything is decoded the same way (Pillow
reads the format from the bytes) and tiled at one common cell size.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image

PAD = 2
MIN_CELL = 64        # small images (28 px MNIST) are scaled up so a person can see them
GIF_FRAME_MS = 120
GIF_LAST_MS = 1500   # hold the final images


def _open(data: bytes) -> Image.Image:
    """PNG, WebP or JPEG bytes as an L or RGB image."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB") if im.mode not in ("L", "RGB") else im


def _fit(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`im` at `size`: blocky when enlarged (the pixels a person should see), averaged when
    shrunk (a final image down to the preview size)."""
    if im.size == size:
        return im
    up = size[0] >= im.size[0] and size[1] >= im.size[1]
    return im.resize(size, Image.Resampling.NEAREST if up else Image.Resampling.BOX)


def tile(images: Sequence[Image.Image | None], size: tuple[int, int], mode: str) -> Image.Image:
    """Images (None: not there yet, left dark) in a near-square grid, each fitted to `size`
    (scaled up if tiny)."""
    n = max(1, len(images))
    ncol = max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    scale = max(1, MIN_CELL // max(size))
    w, h = size[0] * scale, size[1] * scale
    grid = Image.new(mode, (ncol * (w + PAD) + PAD, nrow * (h + PAD) + PAD))
    for i, im in enumerate(images):
        if im is None:
            continue
        r, c = divmod(i, ncol)
        grid.paste(_fit(im, (w, h)).convert(mode), (PAD + c * (w + PAD), PAD + r * (h + PAD)))
    return grid


def _mode(images: Sequence[Image.Image]) -> str:
    return "L" if all(p.mode == "L" for p in images) else "RGB"


def grid_png(pngs: Sequence[bytes]) -> bytes:
    images = [_open(p) for p in pngs]
    size = max(im.size for im in images)
    buf = io.BytesIO()
    tile(images, size, _mode(images)).save(buf, format="PNG")
    return buf.getvalue()


def animation_gif(num_images: int, snapshots: Sequence[tuple[int, int, bytes]],
                  finals: Sequence[bytes | None]) -> bytes:
    """`snapshots`: (step, image index, encoded frame: PNG, WebP or JPEG) in stream order.
    Each GIF frame shows every image at its latest snapshot up to that step; the last one
    shows the final images. Frames that cannot be decoded are skipped.

    Every tile is drawn at one cell size: the snapshot frames' own size when there are
    frames (the largest, should they differ), else the final images'. Frames of a large
    model are previews (e.g. 128 px of a 256 px image): enlarging every frame to the image
    size would make the GIF several times bigger with no detail the frames do not have, so
    the final images are shrunk to the frames' size instead (the full-size images are at
    `images/{i}` and `grid.png`)."""
    by_step: dict[int, dict[int, Image.Image]] = {}
    for step, index, data in snapshots:
        if 0 <= index < num_images:
            try:
                im = _open(data)
            except (OSError, ValueError, Image.DecompressionBombError):
                continue                    # not an image: skipped, not a failed GIF
            by_step.setdefault(step, {})[index] = im
    final = {i: _open(p) for i, p in enumerate(finals) if p is not None}
    shots = [im for frame in by_step.values() for im in frame.values()]
    every = shots + list(final.values())
    if not every:
        raise ValueError("nothing to animate yet")
    size = max(im.size for im in (shots or every))
    mode = _mode(every)
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
