"""A loss-curve PNG drawn with Pillow, so training needs no plotting library."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw


def loss_curve(steps: Sequence[int], losses: Sequence[float], file: Path,
               size: tuple[int, int] = (640, 360)) -> None:
    """Loss against step on a log-scale y axis: the raw values faint, a smoothed line bold."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 15, 25, h - 35
    draw.rectangle((left, top, right, bottom), outline="black")
    points = [(s, v) for s, v in zip(steps, losses, strict=True) if v > 0 and math.isfinite(v)]
    draw.text((left, 5), "training loss (log scale) vs step", fill="black")
    if len(points) < 2:
        img.save(file)
        return
    s0, s1 = points[0][0], max(points[-1][0], points[0][0] + 1)
    logs = [math.log10(v) for _, v in points]
    lo, hi = min(logs), max(logs)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: float, log_v: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left),
                bottom - (log_v - lo) / (hi - lo) * (bottom - top))

    for k in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = math.log10(m) + k
            if lo <= v <= hi:
                _, y = xy(s0, v)
                draw.line((left, y, right, y), fill=(225, 225, 225))
                draw.text((5, y - 6), f"{10 ** v:.3g}", fill="black")
    for frac in (0.0, 0.5, 1.0):
        step = s0 + frac * (s1 - s0)
        x, _ = xy(step, lo)
        draw.text((x - 15, bottom + 8), f"{round(step)}", fill="black")
    draw.line([xy(s, v) for (s, _), v in zip(points, logs, strict=True)], fill=(170, 190, 230))
    smooth, out = logs[0], []
    alpha = min(1.0, 20 / len(logs))
    for (s, _), v in zip(points, logs, strict=True):
        smooth += alpha * (v - smooth)
        out.append(xy(s, smooth))
    draw.line(out, fill=(20, 60, 160), width=2)
    img.save(file)
