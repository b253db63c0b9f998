"""The multipart forms of `POST /v1/images/edits` and `/variations`: as the OpenAPI
document describes them, and read (by the one multipart reader, `app/multipart.py`) into
their request models."""

from __future__ import annotations

import base64
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from contract.inputs import MAX_INPUT_BYTES
from contract.spec import GenerationSpec

from ..errors import ApiError
from ..multipart import file_bytes, form_parts, image_too_large, is_multipart
from .models import GUIDANCE_NEEDS_CLASS, URL_IS_PNG, ImageEditRequest, ImageVariationRequest


def form_schema(model: type[BaseModel], files: dict[str, str], required: list[str],
                rules: list[dict[str, Any]]) -> dict[str, Any]:
    """The multipart form of `model` as the OpenAPI document describes it: its fields as
    parts, `files` (name → description) as binary file parts."""
    schema = model.model_json_schema()
    props = {name: _not_null(p) for name, p in schema["properties"].items()}
    for name, description in files.items():
        props[name] = {"type": "string", "contentMediaType": "application/octet-stream",
                       "description": description}
    out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": props, "required": required}
    if rules:
        out["allOf"] = rules
    return out


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A form part is present or absent, never null: `X | None` is stated as X."""
    alts = [a for a in prop.get("anyOf", ()) if a != {"type": "null"}]
    if "anyOf" not in prop or len(alts) != 1:
        return prop
    out = {k: v for k, v in prop.items() if k != "anyOf"}
    out.update(alts[0])
    if out.get("default", 0) is None:
        del out["default"]
    return out


IMAGE_PART = ("the image (PNG, JPEG, WebP, GIF, BMP or TIFF, one frame, at most 4 MiB): "
              "fitted to the model's size and channels")
MASK_PART = ("inpainting: fully transparent pixels (alpha 0) mark the region to generate "
             "(OpenAI's convention); in a mask without transparency, white (>= 128) marks "
             "it. Same width and height as `image`")
_RESAMPLING_NEEDS_MASK = [
    {"description": f"{f} applies to inpainting (a mask) only",
     "if": {"required": [f], "properties": {f: {
         "type": "integer", "not": {"const": GenerationSpec.model_fields[f].default}}}},
     "then": {"required": ["mask"]}} for f in ("jump_length", "jump_n_sample")]
EDIT_FORM = form_schema(ImageEditRequest, {"image": IMAGE_PART, "mask": MASK_PART},
                        ["image"], [URL_IS_PNG, GUIDANCE_NEEDS_CLASS, *_RESAMPLING_NEEDS_MASK])
VARIATION_FORM = form_schema(ImageVariationRequest, {"image": IMAGE_PART}, ["image"], [])
FILE_PARTS = {"image": "image", "image[]": "image", "mask": "mask"}
MAX_FORM_FIELDS = 40
MAX_FIELD_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)


async def read_form(request: Request, model: type[M], max_bytes: int = MAX_INPUT_BYTES) -> M:
    """A multipart/form-data body as `model`: text parts as its fields (read as strings
    stand for values, `model_validate_strings`: `2` an integer, `true` a boolean), file
    parts in base64; an empty file part is a 400 naming it."""
    if not is_multipart(request):
        raise ApiError(400, "invalid_request", "send multipart/form-data (the `openai` SDK "
                       "does): the image as a file part, the other fields as text parts")
    allowed = {n for n, f in FILE_PARTS.items() if f in model.model_fields}
    fields: dict[str, Any] = {}
    async with form_parts(request, max_files=len(allowed), max_fields=MAX_FORM_FIELDS,
                          max_part_size=MAX_FIELD_BYTES) as parts:
        for name, value in parts:
            key = FILE_PARTS.get(name, name) if name in allowed else name
            if key in fields:
                raise ApiError(400, "invalid_request", f"{key} is given twice (one image "
                               "per request)" if key == "image" else f"{key} is given twice",
                               field=key)
            if name not in allowed:
                fields[key] = value if isinstance(value, str) else "<a file>"
                continue
            if isinstance(value, str):
                data = value.encode()
                if len(data) > max_bytes:       # its size, as the native routes say it
                    raise image_too_large(key, len(data), max_bytes)
            else:
                data = await file_bytes(key, value, max_bytes)
            if not data:
                raise ApiError(400, "invalid_request", f"{key} is an empty file: send "
                               "the image's bytes", field=key)
            fields[key] = base64.b64encode(data).decode()
    return model.model_validate_strings(fields, strict=False)     # text parts: lax
