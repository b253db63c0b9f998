"""Offline sampling: a checkpoint to PNG files, with a progress bar.

An offline run is a request as the API takes it: its options build the same
`GenerationSpec`, checked by the same code (the spec's validators and `check_model` against
what a worker would advertise for the checkpoint), its input images fitted by the same
`fit_inputs`, and its images run as a worker runs a job's (`worker.engine.slot_specs`).
So `ddpm sample` refuses what `POST /v1/generations` refuses (tests/test_request_rules.py),
naming the flag of the field the API names. One thing an offline run takes beyond a
request: more images than one request holds (`--num-images` past MAX_IMAGES; not for an
interpolation, whose frames are one request's images), checked as a request of MAX_IMAGES
and run at the image numbers past them.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from tqdm import tqdm

from contract.inputs import fit_inputs, input_digest
from contract.limits import INPUT_FIELDS, MAX_IMAGES, MODEL_NAME_PATTERN
from contract.spec import GenerationSpec, ModelInfo, SpecError
from models import (
    Checkpoint,
    load_checkpoint,
    make_grid,
    resolve_device,
    sample_progressive,
    save_png,
    to_uint8,
)
from worker.engine import LoadedModel, slot_specs
from worker.job_inputs import input_tensor

# The spec fields an offline run sets from its options (the input images aside).
REQUEST_FIELDS = ("sampler", "steps", "num_images", "seed", "eta", "class_label",
                  "guidance_scale", "strength", "jump_length", "jump_n_sample")
# What the rules see of an input image given but not yet fitted: the rules and the model's
# checks ask only whether each is given (the API's too check them before any image is read).
PENDING_INPUT = "sha256:" + "0" * 64
MAX_OFFLINE_IMAGES = 100_000    # images one offline run writes (requests of MAX_IMAGES)


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
    """Options that do not fit the checkpoint; the CLI prints it without a traceback.
    `field` names the request field at fault (what the API's 422 names), if one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def flag(field: str, opts: SampleOptions) -> str:
    """The option that sets a request field."""
    if opts.interpolate_to is not None and field in ("num_images", *INPUT_FIELDS):
        return "--frames" if field == "num_images" else "--interpolate"
    return "--" + field.replace("_", "-")


def _refusal(field: str, message: str, opts: SampleOptions) -> UsageError:
    return UsageError(f"{flag(field, opts)}: {message}", field)


def _input_paths(opts: SampleOptions) -> dict[str, Path]:
    return {f: p for f in INPUT_FIELDS if (p := getattr(opts, f)) is not None}


def model_name(path: Path) -> str:
    """The name a worker serves this checkpoint directory under (its own name), or
    `checkpoint` where that is no model name."""
    name = path.resolve().name
    return name if re.fullmatch(MODEL_NAME_PATTERN, name) else "checkpoint"


def model_info(ck: Checkpoint, path: Path) -> ModelInfo:
    """What a worker serving this checkpoint advertises: what the API checks against."""
    return LoadedModel.from_checkpoint(model_name(path), ck, 0.0).info


def sample_options(args: argparse.Namespace) -> SampleOptions:
    """`ddpm sample`'s parsed flags as its options: each request field from its flag, as
    given (`check_request` checks them as the API checks a request)."""
    if args.interpolate and args.init_image:
        raise UsageError("--interpolate takes its two images; not with --init-image",
                         "init_image")
    return SampleOptions(
        checkpoint=args.checkpoint, out=args.out, sampler=args.sampler, steps=args.steps,
        num_images=args.frames if args.interpolate else args.num_images, seed=args.seed,
        batch_size=args.batch_size, device=args.device, eta=args.eta,
        class_label=args.class_label, guidance_scale=args.guidance_scale, grid=args.grid,
        init_image=args.interpolate[0] if args.interpolate else args.init_image,
        mask=args.mask, interpolate_to=args.interpolate[1] if args.interpolate else None,
        strength=args.strength, jump_length=args.jump_length,
        jump_n_sample=args.jump_n_sample)


def check_request(opts: SampleOptions, info: ModelInfo) -> GenerationSpec:
    """The request this run is, checked as the API checks a POST body: `GenerationSpec`'s
    validators (bounds, contract/rules.py), then `check_model` against `info`. Its input
    images are PENDING_INPUT; UsageError naming the flag (and the field) otherwise."""
    if opts.num_images > MAX_OFFLINE_IMAGES:
        raise _refusal("num_images", f"at most {MAX_OFFLINE_IMAGES} images a run", opts)
    fields: dict[str, Any] = {f: getattr(opts, f) for f in REQUEST_FIELDS}
    if opts.interpolate_to is None:
        fields["num_images"] = min(opts.num_images, MAX_IMAGES)
    fields.update(dict.fromkeys(_input_paths(opts), PENDING_INPUT))
    try:
        spec = GenerationSpec.model_validate({"model": info.name, **fields})
        spec.check_model(info)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "request"
        raise _refusal(field, err["msg"].removeprefix("Value error, "), opts) from None
    except SpecError as e:
        raise _refusal(e.field, e.message, opts) from None
    return spec


def fit_request(opts: SampleOptions, info: ModelInfo) -> tuple[GenerationSpec,
                                                                dict[str, bytes]]:
    """`check_request`, then the input images read and fitted to the model (as the API
    fits uploads): the spec naming them by digest, and field → fitted PNG."""
    spec = check_request(opts, info)
    paths = _input_paths(opts)
    if not paths:
        return spec, {}
    try:
        pngs = fit_inputs({f: _read(p) for f, p in paths.items()}, size=info.image_size,
                          channels=info.in_channels)
    except SpecError as e:
        raise _refusal(e.field, e.message, opts) from None
    digests = {f: input_digest(png) for f, png in pngs.items()}
    return GenerationSpec.model_validate({**spec.model_dump(), **digests}), pngs


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def run_sample(opts: SampleOptions) -> list[Path]:
    """Generate `opts.num_images` images into `opts.out`; returns the files written."""
    if opts.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    device = resolve_device(opts.device)
    ck = load_checkpoint(opts.checkpoint, device=device,
                         for_inference=True)
    info = model_info(ck, opts.checkpoint)
    spec, pngs = fit_request(opts, info)
    inputs = {f: input_tensor(f, png, info.image_size, info.in_channels).to(device)
              for f, png in pngs.items()}

    opts.out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    images = []
    start = time.perf_counter()
    # Progress counts network steps over all images, as the API's does (RePaint's jumps
    # included): the spec's steps_per_image for each image.
    with tqdm(total=opts.num_images * spec.steps_per_image, unit="step",
              desc="sampling") as bar:
        for first in range(0, opts.num_images, opts.batch_size):
            indices = list(range(first, min(first + opts.batch_size, opts.num_images)))
            slots = slot_specs(spec, inputs, indices, ck.config.diffusion.variance_type)
            final, done_before = None, bar.n
            for progress in sample_progressive(ck.net, ck.schedule, slots, device=device,
                                               **ck.batch_options):
                bar.update(done_before + int(progress.steps_done.sum()) - bar.n)
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
        "checkpoint": str(opts.checkpoint), "sampler": spec.sampler, "steps": spec.steps,
        "eta": spec.eta, "seed": spec.seed, "num_images": opts.num_images,
        "class_label": spec.class_label, "guidance_scale": spec.guidance_scale,
        **({"strength": spec.effective_strength,
            "inputs": {k: str(v) for k, v in _input_paths(opts).items()}} if inputs else {}),
        "device": str(device), "seconds": round(time.perf_counter() - start, 3),
    }
    (opts.out / "sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    return files
