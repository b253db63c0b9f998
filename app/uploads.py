"""Input images in a POST: multipart/form-data read as the JSON body it stands for, and
every image fitted to the model before the job is queued.

`curl -F init_image=@digit.png -F 'request={"strength": 0.6}'` is the same request as a
JSON body with the image in base64: one validation path, one error shape. Fitting happens
here, in a thread (Pillow's work is not for the event loop): an image that cannot be read
is a 422 naming its field, and only fitted PNGs of the model's size reach Redis and the
worker.

Bounds, both shapes alike: an image over MAX_INPUT_BYTES is a 422 naming it, in bytes of
the image (`image_too_large`); what is not an image (a JSON body less its images, a form's
`request` part) over DDPM_MAX_BODY_BYTES is a 413 (`rest_too_large`). The whole body is
bounded before it is read, by DDPM_MAX_UPLOAD_BYTES (`app/body_limit.py`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.types import Message

from contract.inputs import MAX_INPUT_BYTES, decode_base64
from contract.inputs import fit_inputs as fit_images  # this module's fit_inputs is async
from contract.limits import INPUT_FIELDS
from contract.spec import ModelInfo, SpecError

from .errors import ApiError
from .multipart import file_bytes, form_parts, image_too_large, is_multipart

REQUEST_PART = "request"

# The multipart form as the OpenAPI document describes it.
MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        REQUEST_PART: {"type": "string", "description": "the JSON request without its images"
                       " (`GenerationRequest`)", "contentMediaType": "application/json"},
        **{f: {"type": "string", "contentMediaType": "application/octet-stream",
               "description": f"the `{f}` image file"} for f in INPUT_FIELDS},
    },
}


class UploadRoute(APIRoute):
    """A route whose JSON body may also come as multipart/form-data (`as_json`), and whose
    body is bounded by part: each image by MAX_INPUT_BYTES (a 422 naming it), the rest by
    DDPM_MAX_BODY_BYTES (a 413), as the README states for every body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:             # GET, DELETE: no body to read
            return handler

        async def route(request: Request) -> Response:
            # The media type is checked before (app/body_limit.py): JSON or multipart.
            if is_multipart(request):
                request = await as_json(request)
            else:
                await check_json(request)
            return await handler(request)

        return route


def rest_too_large(size: int, limit: int) -> ApiError:
    """The 413 for a request whose fields other than its images pass DDPM_MAX_BODY_BYTES,
    the same for a JSON body and for a form's `request` part."""
    return ApiError(413, "payload_too_large", f"the request without its images is {size} "
                    f"bytes; at most {limit} bytes (DDPM_MAX_BODY_BYTES; only the images "
                    f"{', '.join(INPUT_FIELDS)} may be larger, up to {MAX_INPUT_BYTES} "
                    "bytes each)")


def base64_size(text: str) -> int:
    """The bytes base64 `text` (or a `data:` URL) stands for, counted without decoding it
    (whitespace and padding are not data): what a too-large image is reported as."""
    if text[:5].lower() == "data:":
        text = text[text.find(",") + 1:]
    chars = len(text) - sum(text.count(c) for c in " \t\r\n\v\f=")
    return chars * 3 // 4


def _max_body_bytes(request: Request) -> int:
    return int(request.app.state.settings.max_body_bytes)


async def check_json(request: Request) -> None:
    """A JSON body's images within MAX_INPUT_BYTES each, and the rest of it within
    DDPM_MAX_BODY_BYTES. The parsed body is kept on the request (FastAPI reads it from
    there, not again); a body that does not parse is left for FastAPI to refuse."""
    body = await request.body()
    limit = _max_body_bytes(request)
    if len(body) > limit and not any(f'"{f}"'.encode() in body for f in INPUT_FIELDS):
        raise rest_too_large(len(body), limit)      # no image in it: all of it is the rest
    if len(body) <= limit:
        return                                      # within bounds, images and all
    try:
        obj = await request.json()
    except Exception:       # not JSON (bad syntax, not UTF-8, nested past recursion)
        return
    if not isinstance(obj, dict):
        raise rest_too_large(len(body), limit)
    images = {f: v for f in INPUT_FIELDS if isinstance(v := obj.get(f), str)}
    for field, text in images.items():
        if (size := base64_size(text)) > MAX_INPUT_BYTES:
            raise image_too_large(field, size)
    rest = len(body) - sum(len(text) for text in images.values())
    if rest > limit:
        raise rest_too_large(rest, limit)


async def as_json(request: Request) -> Request:
    """The same request with a JSON body: the `request` part's object, plus each image
    part in base64. 422 for a form that is not one, 413 for a `request` part over
    DDPM_MAX_BODY_BYTES."""
    limit = _max_body_bytes(request)
    body: dict[str, Any] = {}
    # Parts are bounded here, by the limits they are held to, not by Starlette's defaults.
    async with form_parts(request, max_files=len(INPUT_FIELDS),
                          max_fields=len(INPUT_FIELDS) + 1,
                          max_part_size=request.app.state.settings.max_upload_bytes) as parts:
        for name, value in parts:
            if name == REQUEST_PART and isinstance(value, str):
                if (size := len(value.encode())) > limit:
                    raise rest_too_large(size, limit)
                try:
                    obj = json.loads(value)
                except ValueError as e:
                    raise ApiError(422, "invalid_request", f"the {REQUEST_PART!r} part is not "
                                   f"valid JSON: {e}", field=REQUEST_PART) from None
                if not isinstance(obj, dict):
                    raise ApiError(422, "invalid_request", f"the {REQUEST_PART!r} part must "
                                   "be a JSON object", field=REQUEST_PART)
                clash = sorted(set(obj) & set(body))
                body.update(obj)
            elif name in INPUT_FIELDS:
                clash = [name] if name in body else []
                body[name] = await _part_base64(name, value)
            else:
                raise ApiError(422, "invalid_request", f"unknown form part {name!r}: expected "
                               f"{REQUEST_PART!r} and the image files "
                               f"{', '.join(INPUT_FIELDS)}", field=name)
            if clash:
                raise ApiError(422, "invalid_request", f"{clash[0]} is given twice",
                               field=clash[0])
    return with_body(request, json.dumps(body).encode(), b"application/json")


def with_body(request: Request, body: bytes, content_type: bytes) -> Request:
    """A request like `request` whose body is `body` (of `content_type`): its ASGI receive
    hands out `body`, then what the client's connection says (its disconnect)."""
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in request.scope["headers"]
                        if k not in (b"content-type", b"content-length")]
    scope["headers"] += [(b"content-type", content_type),
                         (b"content-length", str(len(body)).encode())]
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await request.receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


async def _part_base64(name: str, value: UploadFile | str) -> str:
    if isinstance(value, str):          # a text part: base64 already
        if (size := base64_size(value)) > MAX_INPUT_BYTES:
            raise image_too_large(name, size)
        return value
    return base64.b64encode(await file_bytes(name, value)).decode()


async def fit_inputs(images: dict[str, str], info: ModelInfo) -> dict[str, bytes]:
    """Each input image (field → base64) fitted to `info`'s size and channels, as PNG."""
    if not images:
        return {}
    try:
        return await run_in_threadpool(_fit, images, info)
    except SpecError as e:
        raise ApiError(422, "invalid_request", str(e), field=e.field) from None


def _fit(images: dict[str, str], info: ModelInfo) -> dict[str, bytes]:
    raw = {f: decode_base64(text, f) for f, text in images.items()}
    return fit_images(raw, size=info.image_size, channels=info.in_channels)
