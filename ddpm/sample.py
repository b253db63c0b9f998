"""Offline sampling: a checkpoint to PNG files, with a progress bar."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from contract.inputs import fit_inputs
from contract.limits import DEFAULT_STRENGTH
from contract.spec import SpecError, start_timestep
from models import (
    SlotSpec,
    check_steps,
    inference_memory_format,
    load_checkpoint,
    make_grid,
    resolve_device,
    sample_progressive,
    sampler_kind,
    save_png,
    to_uint8,
)
from worker.engine import conditioning, input_tensor


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
    init_image: Path | None = None
    mask: Path | None = None
    interpolate_to: Path | None = None
    strength: float | None = None       # None: DEFAULT_STRENGTH of the request's kind
    jump_length: int = 10
    jump_n_sample: int = 1


class UsageError(ValueError):
    """Options that do not fit the checkpoint; the CLI prints it without a traceback."""


def _input_paths(opts: SampleOptions) -> dict[str, Path]:
    paths = {"init_image": opts.init_image, "mask": opts.mask,
             "interpolate_to": opts.interpolate_to}
    return {k: v for k, v in paths.items() if v is not None}


def _inputs(opts: SampleOptions, size: int, channels: int, T: int,
            device: torch.device) -> tuple[dict[str, torch.Tensor], float]:
    """The input images fitted to the model (as the API fits uploads) and the strength."""
    paths = _input_paths(opts)
    if not paths:
        return {}, 1.0
    kind = "inpaint" if opts.mask else "interpolate" if opts.interpolate_to else "img2img"
    strength = DEFAULT_STRENGTH[kind] if opts.strength is None else opts.strength
    if not 0.0 < strength <= 1.0:
        raise UsageError("--strength must be in (0, 1]")
    if opts.steps > start_timestep(strength, T) + 1:
        raise UsageError(f"--steps {opts.steps} do not fit in the "
                         f"{start_timestep(strength, T) + 1} timesteps strength {strength} "
                         "leaves; ask for fewer steps or a higher strength")
    if opts.interpolate_to is not None and opts.num_images < 2:
        raise UsageError("an interpolation needs at least 2 frames")
    try:
        pngs = fit_inputs({k: _read(p) for k, p in paths.items()}, size=size,
                          channels=channels)
    except SpecError as e:
        flag = {"init_image": "--init-image", "mask": "--mask",
                "interpolate_to": "--interpolate"}.get(e.field, e.field)
        raise UsageError(f"{flag}: {e.message}") from None
    return {k: input_tensor(k, png, size, channels).to(device) for k, png in pngs.items()}, \
        strength


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def run_sample(opts: SampleOptions) -> list[Path]:
    """Generate `opts.num_images` images into `opts.out`; returns the files written."""
    device = resolve_device(opts.device)
    ck = load_checkpoint(opts.checkpoint, device=device,
                         memory_format=inference_memory_format(device))
    ucfg = ck.config.unet
    T = ck.config.diffusion.num_timesteps
    check_steps(opts.steps, T, "--steps")
    if opts.num_images < 1 or opts.batch_size < 1:
        raise UsageError("--num-images and --batch-size must be >= 1")
    if opts.class_label is not None and not ck.conditional:
        raise UsageError("--class-label was given, but this model is unconditional")
    if opts.class_label is not None and not 0 <= opts.class_label < ucfg.num_classes:
        raise UsageError(f"--class-label must be in 0..{ucfg.num_classes - 1}")
    if opts.guidance_scale != 1.0 and opts.class_label is None:
        raise UsageError("--guidance-scale needs --class-label (and a class-conditional model)")
    kind = sampler_kind(opts.sampler, ck.config.diffusion.variance_type)
    inputs, strength = _inputs(opts, ucfg.image_size, ucfg.in_channels, T, device)

    opts.out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    images = []
    start = time.perf_counter()
    n_batches = math.ceil(opts.num_images / opts.batch_size)
    with tqdm(total=n_batches * opts.steps, unit="step", desc="sampling") as bar:
        for first in range(0, opts.num_images, opts.batch_size):
            indices = range(first, min(first + opts.batch_size, opts.num_images))
            specs = [SlotSpec(seed=opts.seed, steps=opts.steps, kind=kind, eta=opts.eta,
                              label=opts.class_label, guidance=opts.guidance_scale,
                              **conditioning(inputs, i, opts.num_images, strength=strength,
                                             jump_length=opts.jump_length,
                                             jump_n_sample=opts.jump_n_sample))
                     for i in indices]
            final = None
            for progress in sample_progressive(ck.net, ck.schedule, specs, device=device,
                                               **ck.batch_options):
                bar.update(1)
                final = progress.x_t
            assert final is not None
            pixels = to_uint8(final)
            for i, img in zip(indices, pixels, strict=True):
                file = opts.out / f"{i:04d}.png"
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
        **({"strength": strength, "inputs": {k: str(v) for k, v in _input_paths(opts).items()}}
           if inputs else {}),
        "device": str(device), "seconds": round(time.perf_counter() - start, 3),
    }
    (opts.out / "sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    return files
