"""Input images in a POST: multipart/form-data read as the JSON body it stands for, and
every image fitted to the model before the job is queued.

`curl -F init_image=@digit.png -F 'request={"strength": 0.6}'` is the same request as a
JSON body with the image in base64: one validation path, one error shape. Fitting happens
here, in a thread (Pillow's work is not for the event loop): an image that cannot be read
is a 422 naming its field, and only fitted PNGs of the model's size reach Redis and the
worker.
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
from starlette.exceptions import HTTPException

from worker.contract import INPUT_FIELDS, ModelInfo, SpecError
from worker.inputs import MAX_INPUT_BYTES, decode_base64
from worker.inputs import fit_inputs as fit_images  # this module's fit_inputs is async

from .errors import ApiError

REQUEST_PART = "request"
MAX_REQUEST_PART = 64 * 1024

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
    """A route whose JSON body may also come as multipart/form-data (`as_json`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            ctype = request.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() == "multipart/form-data":
                request = await as_json(request)
            return await handler(request)

        return route


async def as_json(request: Request) -> Request:
    """The same request with a JSON body: the `request` part's object, plus each image
    part in base64. 422 for a form that is not one."""
    try:
        form = await request.form(max_files=len(INPUT_FIELDS),
                                  max_fields=len(INPUT_FIELDS) + 1,
                                  max_part_size=MAX_REQUEST_PART)
    except HTTPException as e:      # malformed, too many parts, a part too large
        raise ApiError(422, "invalid_request", f"the multipart form cannot be read: "
                       f"{e.detail}") from None
    body: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if name == REQUEST_PART and isinstance(value, str):
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
    finally:
        await form.close()
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in request.scope["headers"]
                        if k not in (b"content-type", b"content-length")]
    scope["headers"].append((b"content-type", b"application/json"))
    converted = Request(scope, request.receive)
    converted._body = json.dumps(body).encode()     # what Request.body() returns
    return converted


async def _part_base64(name: str, value: UploadFile | str) -> str:
    if isinstance(value, str):          # a text part: base64 already
        return value
    data = await value.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise ApiError(422, "invalid_request", f"the image is larger than {MAX_INPUT_BYTES} "
                       "bytes", field=name)
    return base64.b64encode(data).decode()


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
