"""Offline sampling: a checkpoint to PNG files, with a progress bar."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from models import (
    SlotSpec,
    inference_memory_format,
    load_checkpoint,
    make_grid,
    resolve_device,
    sample_progressive,
    sampler_kind,
    to_uint8,
)


@dataclass(frozen=True)
class SampleOptions:
    checkpoint: Path
    out: Path
    sampler: str = "ddim"
    steps: int = 50
    num_images: int = 16
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    eta: float = 0.0
    class_label: int | None = None
    guidance_scale: float = 1.0
    grid: bool = False


class UsageError(ValueError):
    """Options that do not fit the checkpoint; the CLI prints it without a traceback."""


def save_png(pixels: torch.Tensor, file: Path) -> None:
    """Write one `[H x W x C]` uint8 image (C = 1 grey, 3 RGB)."""
    arr = pixels.numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(file)


def run_sample(opts: SampleOptions) -> list[Path]:
    """Generate `opts.num_images` images into `opts.out`; returns the files written."""
    device = resolve_device(opts.device)
    ck = load_checkpoint(opts.checkpoint, device=device,
                         memory_format=inference_memory_format(device))
    ucfg = ck.config.unet
    T = ck.config.diffusion.num_timesteps
    if not 1 <= opts.steps <= T:
        raise UsageError(f"--steps must be in 1..{T} for this model")
    if opts.num_images < 1 or opts.batch_size < 1:
        raise UsageError("--num-images and --batch-size must be >= 1")
    if opts.class_label is not None and not ck.conditional:
        raise UsageError("--class-label was given, but this model is unconditional")
    if opts.class_label is not None and not 0 <= opts.class_label < ucfg.num_classes:
        raise UsageError(f"--class-label must be in 0..{ucfg.num_classes - 1}")
    if opts.guidance_scale != 1.0 and opts.class_label is None:
        raise UsageError("--guidance-scale needs --class-label (and a class-conditional model)")
    kind = sampler_kind(opts.sampler, ck.config.diffusion.variance_type)

    opts.out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    images = []
    start = time.perf_counter()
    n_batches = math.ceil(opts.num_images / opts.batch_size)
    with tqdm(total=n_batches * opts.steps, unit="step", desc="sampling") as bar:
        for first in range(0, opts.num_images, opts.batch_size):
            specs = [SlotSpec(seed=opts.seed, index=i, steps=opts.steps, kind=kind, eta=opts.eta,
                              label=opts.class_label, guidance=opts.guidance_scale)
                     for i in range(first, min(first + opts.batch_size, opts.num_images))]
            final = None
            for progress in sample_progressive(
                ck.net, ck.schedule, specs, shape=(ucfg.in_channels, ucfg.image_size,
                                                   ucfg.image_size),
                device=device, num_classes=ucfg.num_classes,
                clip_denoised=ck.config.diffusion.clip_denoised,
            ):
                bar.update(1)
                final = progress.x_t
            assert final is not None
            pixels = to_uint8(final)
            for spec, img in zip(specs, pixels, strict=True):
                file = opts.out / f"{spec.index:04d}.png"
                save_png(img, file)
                files.append(file)
            images.append(pixels)
    if opts.grid:
        file = opts.out / "grid.png"
        save_png(make_grid(torch.cat(images)), file)
        files.append(file)
    meta = {
        "checkpoint": str(opts.checkpoint), "sampler": opts.sampler, "steps": opts.steps,
        "eta": opts.eta, "seed": opts.seed, "num_images": opts.num_images,
        "class_label": opts.class_label, "guidance_scale": opts.guidance_scale,
        "device": str(device), "seconds": round(time.perf_counter() - start, 3),
    }
    (opts.out / "sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    return files
