"""An OpenAI request mapped onto the native one: `prompt` → `class_label`, `n` →
`num_images`, `image` → `init_image`, `partial_images` → x̂0 snapshots; checked against
the model as `POST /v1/generations` checks it."""

from __future__ import annotations

from typing import Any

from contract.limits import STREAM_MAX_BYTES
from contract.spec import ModelInfo, SpecError

from ..errors import ApiError
from ..schemas import GenerationRequest
from .models import Common

# img2img strength of `POST /v1/images/variations` when the request gives none: visibly
# different images that stay variations of the input. Measured with the shipped MNIST model
# and its digit classifier (16 variations, 20 steps, of one generated image of each digit):
# the digit is kept in 151 of 160 at 0.4 (mean pixel change 13/255), 111 at 0.5, 70 at
# 0.6 and 49 at 0.7 (SDEdit's usual 0.75 mostly draws another digit).
VARIATION_STRENGTH = 0.4


def class_label(prompt: str, info: ModelInfo) -> int | None:
    """The class a prompt names (its name, any case, or its index); None for an empty
    prompt. Anything else is a 400 naming `prompt` and listing the classes."""
    text = prompt.strip()
    if not text:
        return None
    if not info.num_classes:
        raise ApiError(400, "invalid_request", f"model {info.name!r} is unconditional: "
                       "prompt must be empty", field="prompt")
    names = list(info.class_names) or [str(i) for i in range(info.num_classes)]
    for i, name in enumerate(names):
        if text.casefold() == name.casefold():
            return i
    if text.isdecimal() and int(text) < info.num_classes:
        return int(text)
    shown = ", ".join(names[:50]) + (f", … ({len(names)} in all)" if len(names) > 50 else "")
    raise ApiError(400, "invalid_request", f"prompt {text[:80]!r} is not a class of model "
                   f"{info.name!r}: give a class name or index ({shown}), or an empty "
                   "prompt for unconditional generation", field="prompt")


def model_size(info: ModelInfo) -> str:
    return f"{info.image_size}x{info.image_size}"


def check_size(size: str | None, info: ModelInfo) -> None:
    if size not in (None, "auto", model_size(info)):
        raise ApiError(400, "invalid_request", f"size must be {model_size(info)!r} (model "
                       f"{info.name!r} draws that size only), 'auto', or left out",
                       field="size")


def knobs(body: Common, info: ModelInfo, **more: Any) -> dict[str, Any]:
    """The native request fields every route fills the same way, and `more`."""
    return {"model": info.name, "num_images": body.n, "steps": body.steps,
            "sampler": body.sampler, "seed": body.seed, "priority": body.priority, **more}


def native_request(info: ModelInfo, fields: dict[str, Any], partial_images: int,
                   stream_max_bytes: int = STREAM_MAX_BYTES) -> GenerationRequest:
    """The native request (unset fields left to its defaults), checked against the
    model; with `partial_images`, x̂0 snapshots spaced so that each image has at least
    that many before its last step (when it has enough steps).

    Those snapshots are at most 2 × partial_images per image (every ⌊s / (p + 1)⌋ of s
    steps), at the default preview size and format: at most 6 × 64 frames of ~14 KB,
    ~5 MB, within the default stream byte budget (`STREAM_MAX_BYTES`, 8 MiB) for any
    model. A service configured with a smaller `stream_max_bytes` refuses what would not
    fit, naming `partial_images`."""
    fields = {k: v for k, v in fields.items() if v is not None}
    req = GenerationRequest(**fields)
    if partial_images:
        every = max(1, req.steps_per_image // (partial_images + 1))
        req = GenerationRequest(**fields, snapshot_every=every, snapshot_kind="x0")
    try:
        req.check_model(info)
    except SpecError as e:
        raise ApiError(400, "invalid_request", str(e), field=e.field) from None
    try:
        req.check_stream_budget(info, stream_max_bytes)
    except SpecError:               # the snapshots are the partial images'
        need = req.snapshot_bytes(info)
        raise ApiError(400, "invalid_request", f"partial_images: {partial_images} per image "
                       f"for {req.num_images} images make {req.snapshot_frames} previews of "
                       f"about {need / 2**20:.1f} MiB in all, over the "
                       f"{stream_max_bytes / 2**20:.1f} MiB this server's event streams "
                       "hold; ask for fewer partial_images or a smaller n",
                       field="partial_images") from None
    return req
