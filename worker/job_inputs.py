"""A job's input images (img2img, inpainting, interpolation) as the engine's slots take
them: stored PNGs checked against the spec's digests and turned into model-space tensors,
each image's conditioning fields of its `SlotSpec`, and its `SlotSpec` (`slot_specs`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from contract.inputs import decode_canonical
from contract.spec import GenerationSpec, ModelInfo
from models import SlotSpec, from_uint8, sampler_kind


def input_tensors(spec: GenerationSpec, pngs: Mapping[str, bytes | None],
                  info: ModelInfo) -> dict[str, Tensor]:
    """A job's stored input images (field → fitted PNG) as model-space tensors `[C x H x W]`
    (a mask: `[1 x H x W]`, 1 = generate); ValueError naming the field if one is missing,
    is not the image the spec names, or does not fit the model."""
    out: dict[str, Tensor] = {}
    for name, digest in spec.inputs.items():
        png = pngs.get(name)
        if png is None:
            raise ValueError(f"{name}: the input image is gone (expired, or never stored)")
        if "sha256:" + hashlib.sha256(png).hexdigest() != digest:
            raise ValueError(f"{name}: the stored input image is not the one the job names")
        out[name] = input_tensor(name, png, info.image_size, info.in_channels)
    return out


def input_tensor(name: str, png: bytes, size: int, channels: int) -> Tensor:
    """A fitted input PNG (contract/inputs.py) as the sampler takes it: an image in model
    space `[C x H x W]`, a mask `[1 x H x W]` with 1 = generate."""
    if name == "mask":
        return torch.from_numpy(decode_canonical(png, size=size, channels=1) >= 128) \
            .permute(2, 0, 1).float()
    pixels = torch.from_numpy(decode_canonical(png, size=size, channels=channels))
    return from_uint8(pixels.permute(2, 0, 1))


def conditioning(inputs: Mapping[str, Tensor], index: int, num_images: int, *,
                 strength: float, jump_length: int, jump_n_sample: int) -> dict[str, Any]:
    """The SlotSpec fields of image `index` of a request with these input images (none: a
    plain one). The frames of an interpolation share image 0's noise (the paper fixes
    it), each at its own λ from 0 (init_image) to 1 (interpolate_to)."""
    if "init_image" not in inputs:
        return {"index": index}
    b = inputs.get("interpolate_to")
    return {"index": 0 if b is not None else index, "init": inputs["init_image"],
            "strength": strength, "mask": inputs.get("mask"), "init_b": b,
            "mix": index / max(1, num_images - 1) if b is not None else 0.0,
            "jump_length": jump_length, "jump_n_sample": jump_n_sample}


def slot_specs(s: GenerationSpec, inputs: Mapping[str, Tensor], indices: list[int],
               variance_type: str) -> list[SlotSpec]:
    """The slots of these images of a request (`inputs`: its input images as model-space
    tensors): the worker's jobs and `ddpm sample` make their slots here alike."""
    kind = sampler_kind(s.sampler, variance_type)  # type: ignore[arg-type]
    return [SlotSpec(seed=s.seed, steps=s.steps, kind=kind, eta=s.eta, label=s.class_label,
                     guidance=s.guidance_scale,
                     **conditioning(inputs, i, s.num_images, strength=s.effective_strength,
                                    jump_length=s.jump_length, jump_n_sample=s.jump_n_sample))
            for i in indices]
