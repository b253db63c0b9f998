"""The OpenAI Images API over our jobs: request, response and event shapes, and OpenAI's
error shape (`app/routes/openai_images.py`; waiting for the job: `app/openai_wait.py`).

What the `openai` SDK sends and reads, mapped onto the native API:

- a request becomes a `GenerationRequest` (`prompt` → `class_label`, `n` → `num_images`,
  `image` → `init_image`) and goes through the same checks, `fit_inputs` and
  `JobStore.asubmit` (one admission: rate limit, queue depth) as `POST /v1/generations`;
- the route then follows the job's event stream (`app.streams.follow`, as SSE clients
  do) until it ends, bounded by `DDPM_IMAGES_TIMEOUT_S`, while it watches for the client
  leaving; a request that does not get its images cancels its job;
- errors are `{"error": {"message", "type", "param", "code"}}` with the statuses the SDK
  maps to its exception classes (a native 422 is OpenAI's 400).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.limits import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_JUMP_LENGTH,
    MAX_JUMP_N_SAMPLE,
    MAX_SEED,
    MAX_STEPS,
    MODEL_NAME_PATTERN,
    STREAM_MAX_BYTES,
    Priority,
    Sampler,
)
from contract.spec import ModelInfo, RequestModel, SpecError

from .errors import ApiError, _field, _validation_message, redis_error
from .jobs import Served
from .schemas import GenerationRequest
from .uploads import image_too_large

log = logging.getLogger("ddpm.api")

# Native request fields under the names these routes use.
PARAMS = {"num_images": "n", "init_image": "image", "class_label": "prompt"}

# img2img strength of `POST /v1/images/variations` when the request gives none: visibly
# different images that stay variations of the input. Measured with the shipped MNIST model
# and its digit classifier (16 variations, 20 steps, of one generated image of each digit):
# the digit is kept in 151 of 160 at 0.4 (mean pixel change 13/255), 111 at 0.5, 70 at
# 0.6 and 49 at 0.7 (SDEdit's usual 0.75 mostly draws another digit).
VARIATION_STRENGTH = 0.4
MAX_PARTIAL_IMAGES = 3
MAX_PROMPT = 1000
# What responses and events report for OpenAI's `background` and `quality`: the images
# are opaque, and `quality` does not choose the work (`steps` does).
BACKGROUND = "opaque"
QUALITY = "auto"
NO_RETRY = {"x-should-retry": "false"}    # the SDK obeys this header over its own policy


# -- errors ------------------------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """The body of every error response of the `/v1/images` routes (OpenAI's shape)."""

    error: OpenAIErrorDetail


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          403: "invalid_request_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "requests"}
_CODES = {"invalid_request": "invalid_value", "unauthorized": "invalid_api_key",
          "rate_limited": "rate_limit_exceeded", "bad_request": "invalid_value"}
_PYDANTIC_CODES = {"missing": "missing_required_parameter",
                   "extra_forbidden": "unknown_parameter"}


def openai_error(status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None
                 ) -> JSONResponse:
    """An error response in OpenAI's shape; a 422 becomes OpenAI's 400."""
    status = 400 if status == 422 else status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = OpenAIErrorBody(error=OpenAIErrorDetail(message=message, type=kind, param=param,
                                                   code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _param(field: str | None) -> str | None:
    return PARAMS.get(field, field) if field is not None else None


def from_api_error(e: ApiError) -> JSONResponse:
    param = _param(e.field)
    code = _CODES.get(e.code, e.code)
    if e.status == 404 and param == "model":
        code = "model_not_found"
    return openai_error(e.status, _rename(e.message), param=param, code=code,
                        headers=e.headers)


def _rename(message: str) -> str:
    """`message` naming the fields as the client sent them."""
    for native, ours in PARAMS.items():
        message = message.replace(native, ours)
    return message


def _from_validation(e: RequestValidationError | ValidationError) -> JSONResponse:
    errors = list(e.errors())
    if errors and errors[0].get("type") == "json_invalid":
        return openai_error(400, "the request body is not valid JSON", code="invalid_json")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    parts = []
    for err in errors[:10]:
        f = _param(_field(err.get("loc", ())))
        text = _rename(_validation_message(err))
        parts.append(f"{f}: {text}" if f else text)
    return openai_error(400, "; ".join(parts), param=_param(_field(first.get("loc", ()))),
                        code=_PYDANTIC_CODES.get(str(first.get("type")), "invalid_value"))


def error_for(exc: Exception) -> JSONResponse:
    """What an exception raised while serving one of these routes answers."""
    if isinstance(exc, ApiError):
        return from_api_error(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return openai_error(exc.status_code, detail, headers=getattr(exc, "headers", None))
    if isinstance(exc, RedisError):
        return from_api_error(redis_error(exc))
    log.exception("unhandled error", exc_info=exc)
    return openai_error(500, "internal error", code="internal_error")


class OpenAIRoute(APIRoute):
    """A route whose errors, its dependencies' (the API key) and its body validation's
    included, come in OpenAI's shape; the rest of the API keeps its own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                return error_for(e)

        return route


_OPENAI_ERRORS = {
    400: "invalid parameter; `param` names it (OpenAI's 400 where the native API says 422)",
    401: "missing or unknown API key", 404: "unknown model", 409: "the job was canceled",
    413: "request body too large", 429: "rate limit, queue full or too many open waits; "
    "see Retry-After", 500: "the generation failed", 503: "Redis unreachable or full (out of "
    "memory), or the server holds too many open waits",
    504: "the job did not end within DDPM_IMAGES_TIMEOUT_S; it is canceled"}
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": OpenAIErrorBody, "description": d} for s, d in _OPENAI_ERRORS.items()}


# -- requests ----------------------------------------------------------------------------

ResponseFormat = Literal["b64_json", "url"]
OutputFormat = Literal["png", "jpeg", "webp"]
SIZE_PATTERN = r"^(?:auto|[0-9]{1,5}x[0-9]{1,5})$"

_N = Annotated[int | None, Field(ge=1, le=MAX_IMAGES, description=(
    f"images to generate, 1-{MAX_IMAGES} [1]"))]
_MODEL = Annotated[str | None, Field(pattern=MODEL_NAME_PATTERN, description=(
    "a served model (`GET /v1/models`); may be left out while exactly one is served"))]
_SIZE = Annotated[str | None, Field(pattern=SIZE_PATTERN, description=(
    "the model's own size, e.g. `28x28`, or `auto`; omit it for the same"))]
_RESPONSE_FORMAT = Annotated[ResponseFormat | None, Field(description=(
    "`b64_json` [default]: the image in the response; `url`: a link to "
    "`GET /v1/generations/{id}/images/{i}` (a PNG; it takes the same API key)"))]
_OUTPUT_FORMAT = Annotated[OutputFormat | None, Field(description=(
    "encoding of `b64_json` images [png]; `url` images are PNG"))]
_COMPRESSION = Annotated[int | None, Field(ge=0, le=100, description=(
    "jpeg/webp quality, 0-100 [100]"))]
_USER = Annotated[str | None, Field(max_length=256, description="accepted, not stored")]
_STREAM = Annotated[bool | None, Field(description=(
    "Server-Sent Events: `partial_images` previews per image, then each final image"))]
_PARTIAL = Annotated[int | None, Field(ge=0, le=MAX_PARTIAL_IMAGES, description=(
    "with `stream`: x̂0 previews per image (0-3), spaced over the run"))]
_BACKGROUND = Annotated[Literal["opaque", "auto"] | None, Field(description=(
    "the images are opaque; `transparent` is not offered"))]
_QUALITY = Annotated[Literal["standard", "hd", "low", "medium", "high", "auto"] | None,
                     Field(description="accepted and ignored: `steps` sets the work")]
# Ours, as the SDK's `extra_body`.
_STEPS = Annotated[int | None, Field(ge=1, le=MAX_STEPS, description="denoising steps [25]")]
_SAMPLER = Annotated[Sampler | None, Field(description="[dpm++2m]")]
_GUIDANCE = Annotated[float | None, Field(ge=0.0, le=MAX_GUIDANCE, description=(
    "classifier-free guidance [1]; other than 1 needs a `prompt` naming a class"))]
_SEED = Annotated[int | None, Field(ge=0, le=MAX_SEED, description="[random]")]
_PRIORITY = Annotated[Priority | None, Field(description="[normal]")]
_STRENGTH = Annotated[float | None, Field(gt=0.0, le=1.0, description=(
    "how far into the noise the image goes: 1 = pure noise"))]
_PROMPT = Annotated[str, Field(max_length=MAX_PROMPT, description=(
    "a class of a class-conditional model, by name or index (`7`, `airplane`); empty "
    "for unconditional generation. Depends on the model: one of its `class_names` or an "
    "index below its `num_classes` (`GET /v1/models`), else a 400 naming `prompt`"))]

# The rules across fields (JSON Schema if/then), so that clients and fuzzers see them.
_URL_IS_PNG = {
    "description": "`url` images are PNG: another `output_format` needs `b64_json`",
    "if": {"required": ["response_format"],
           "properties": {"response_format": {"const": "url"}}},
    "then": {"properties": {"output_format": {"enum": ["png", None]}}}}
_GUIDANCE_NEEDS_CLASS = {
    "description": "guidance_scale other than 1 needs a prompt naming a class",
    "if": {"required": ["guidance_scale"],
           "properties": {"guidance_scale": {"type": "number", "not": {"const": 1}}}},
    "then": {"required": ["prompt"], "properties": {"prompt": {"minLength": 1}}}}


class _Common(RequestModel):
    """Strict (`RequestModel`): a JSON `true` is no integer here either."""

    model: _MODEL = None
    n: _N = None
    size: _SIZE = None
    response_format: _RESPONSE_FORMAT = None
    user: _USER = None
    steps: _STEPS = None
    sampler: _SAMPLER = None
    seed: _SEED = None
    priority: _PRIORITY = None


class _Output(_Common):
    output_format: _OUTPUT_FORMAT = None
    output_compression: _COMPRESSION = None
    background: _BACKGROUND = None
    quality: _QUALITY = None
    stream: _STREAM = None
    partial_images: _PARTIAL = None
    guidance_scale: _GUIDANCE = None


class ImageGenerationRequest(_Output):
    """`POST /v1/images/generations`, as OpenAI's `images.generate` sends it; `steps`,
    `sampler`, `guidance_scale`, `seed` and `priority` are this server's (the SDK's
    `extra_body`). Unknown fields are a 400 naming them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"model": "mnist", "prompt": "7", "n": 4, "response_format": "b64_json",
                      "steps": 25, "guidance_scale": 3, "seed": 42}],
        "allOf": [_URL_IS_PNG, _GUIDANCE_NEEDS_CLASS]})

    prompt: _PROMPT = ""
    style: Literal["vivid", "natural"] | None = Field(None, description="accepted, ignored")
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted, ignored")


class ImageEditRequest(_Output):
    """`POST /v1/images/edits` (multipart/form-data): inpainting with a `mask`, img2img
    without. The images come as file parts; see the operation's request body."""

    model_config = ConfigDict(extra="forbid")

    image: str                      # base64 of the file part
    mask: str | None = None
    prompt: _PROMPT = ""
    input_fidelity: Literal["high", "low"] | None = None
    strength: _STRENGTH = None
    jump_length: Annotated[int | None, Field(ge=1, le=MAX_JUMP_LENGTH, description=(
        "RePaint resampling (with a mask) [10]"))] = None
    jump_n_sample: Annotated[int | None, Field(ge=1, le=MAX_JUMP_N_SAMPLE, description=(
        "RePaint resampling (with a mask) [1: none]"))] = None


class ImageVariationRequest(_Common):
    """`POST /v1/images/variations` (multipart/form-data): img2img of `image` at
    `strength` [0.4], with no class."""

    model_config = ConfigDict(extra="forbid")

    image: str
    strength: _STRENGTH = None


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
     "if": {"required": [f], "properties": {f: {"type": "integer", "not": {"const": d}}}},
     "then": {"required": ["mask"]}} for f, d in (("jump_length", 10), ("jump_n_sample", 1))]
EDIT_FORM = form_schema(ImageEditRequest, {"image": IMAGE_PART, "mask": MASK_PART},
                        ["image"], [_URL_IS_PNG, _GUIDANCE_NEEDS_CLASS,
                                    *_RESAMPLING_NEEDS_MASK])
VARIATION_FORM = form_schema(ImageVariationRequest, {"image": IMAGE_PART}, ["image"], [])
FILE_PARTS = {"image": "image", "image[]": "image", "mask": "mask"}
MAX_FORM_FIELDS = 40
MAX_FIELD_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)


async def read_form(request: Request, model: type[M], max_bytes: int) -> M:
    """A multipart/form-data body as `model`: text parts as its fields (read as strings
    stand for values, `model_validate_strings`: `2` an integer, `true` a boolean), file
    parts in base64; an empty file part is a 400 naming it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(400, "invalid_request", "send multipart/form-data (the `openai` SDK "
                       "does): the image as a file part, the other fields as text parts")
    allowed = {n for n, f in FILE_PARTS.items() if f in model.model_fields}
    try:
        form = await request.form(max_files=len(allowed), max_fields=MAX_FORM_FIELDS,
                                  max_part_size=MAX_FIELD_BYTES)
    except StarletteHTTPException as e:     # malformed, too many parts, a part too large
        if e.status_code == 413:
            raise
        raise ApiError(400, "invalid_request", "the multipart form cannot be read: "
                       f"{e.detail}") from None
    fields: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            key = FILE_PARTS.get(name, name) if name in allowed else name
            if key in fields:
                raise ApiError(400, "invalid_request", f"{key} is given twice (one image "
                               "per request)" if key == "image" else f"{key} is given twice",
                               field=key)
            if name in allowed:
                if isinstance(value, str):
                    data = value.encode()
                else:
                    data = await value.read(max_bytes + 1)
                if len(data) > max_bytes:       # its size, as the native routes say it
                    rest = b"" if isinstance(value, str) else await value.read()
                    raise image_too_large(key, len(data) + len(rest), max_bytes)
                if not data:
                    raise ApiError(400, "invalid_request", f"{key} is an empty file: send "
                                   "the image's bytes", field=key)
                fields[key] = base64.b64encode(data).decode()
            else:
                fields[key] = value if isinstance(value, str) else "<a file>"
    finally:
        await form.close()
    return model.model_validate_strings(fields, strict=False)     # text parts: lax


# -- mapping a request onto the native one ----------------------------------------------


def served_model(served: dict[str, Served], name: str | None) -> Served:
    """The model a request names (or the only one served)."""
    if name is None:
        if len(served) == 1:
            return next(iter(served.values()))
        raise ApiError(400, "invalid_request", "model is required: " + (
            f"{len(served)} models are served: {', '.join(served)}" if served else
            "no model is served (no live worker)"), field="model")
    model = served.get(name)
    if model is None:
        names = ", ".join(served) or "none (no live worker)"
        raise ApiError(404, "not_found", f"the model {name!r} does not exist: served models "
                       f"are {names}", field="model")
    return model


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


# -- responses ---------------------------------------------------------------------------


class InputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class ImagesUsage(BaseModel):
    """OpenAI counts tokens; a DDPM has none. `output_tokens` (and `total_tokens`) count
    the denoising steps run: `n` × steps per image (RePaint's jumps included)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int


class ImageData(BaseModel):
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    b64_json: str | None = Field(None, description="with response_format b64_json")
    url: str | None = Field(None, description="with response_format url")


class ImagesResponse(BaseModel):
    """What `images.generate`, `images.edit` and `images.create_variation` return."""

    created: int = Field(description="Unix time (s)")
    data: list[ImageData]
    background: Literal["opaque"]
    output_format: OutputFormat
    size: str = Field(description="the model's size, `WxH`")
    usage: ImagesUsage


class PartialImageEvent(BaseModel):
    """`image_generation.partial_image` (`image_edit.partial_image` for edits): an x̂0
    preview; `image_index` (ours) says which of the `n` images."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    b64_json: str
    background: str
    created_at: int
    output_format: OutputFormat
    partial_image_index: int
    quality: str
    size: str
    image_index: int


class CompletedEvent(BaseModel):
    """`image_generation.completed` (`image_edit.completed`): one final image."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    b64_json: str
    background: str
    created_at: int
    output_format: OutputFormat
    quality: str
    size: str
    usage: ImagesUsage
    image_index: int


class ErrorEvent(BaseModel):
    """The job failed, was canceled, or ran past the timeout: the stream's last event (the
    SDK raises it as an `APIError`)."""

    type: Literal["error"]
    error: OpenAIErrorDetail


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s schema whose nested models refer to the document's components (they are
    there: ImagesResponse and OpenAIErrorBody bring them)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


STREAM_RESPONSE = {"text/event-stream": {
    "x-itemSchema": {"type": "object", "properties": {
        "event": {"type": "string", "description": "the data's `type`"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [_inline(m) for m in (
                     PartialImageEvent, CompletedEvent, ErrorEvent)]}}}},
    "x-description": "with `stream: true`: per image, `partial_images` previews, then the "
                     "image; an `error` event ends a stream that fails"}}


def usage(steps: int) -> dict[str, Any]:
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": steps, "total_tokens": steps}


def encode(image: bytes, output_format: str, compression: int | None,
           source_format: str = "png") -> bytes:
    """An image (a stored PNG, or a snapshot frame in `source_format`: png, webp or jpeg)
    in the asked format (Pillow; `compression` is the quality of jpeg and webp). An image
    already in that format is passed on as it is."""
    if output_format == source_format:
        return image
    from PIL import Image

    im = Image.open(io.BytesIO(image))
    im.load()
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    if output_format == "webp" and im.mode == "L":
        im = im.convert("RGB")
    buf = io.BytesIO()
    if output_format == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG" if output_format == "jpeg" else "WEBP",
                quality=100 if compression is None else compression)
    return buf.getvalue()


class Output:
    """How one request wants its images back."""

    def __init__(self, kind: str, info: ModelInfo, body: _Common, base_url: str) -> None:
        self.kind = kind                                   # image_generation / image_edit
        self.size = model_size(info)
        self.response_format = body.response_format or "b64_json"
        self.format: str = getattr(body, "output_format", None) or "png"
        self.compression: int | None = getattr(body, "output_compression", None)
        self.base_url = base_url.rstrip("/")
        if self.response_format == "url" and self.format != "png":
            raise ApiError(400, "invalid_request", "url images are PNG: ask for b64_json "
                           f"to get {self.format}", field="output_format")

    def b64(self, image: bytes, source_format: str = "png") -> str:
        return base64.b64encode(encode(image, self.format, self.compression,
                                       source_format)).decode()

    def url(self, job_id: str, index: int) -> str:
        return f"{self.base_url}/v1/generations/{job_id}/images/{index}"

    def body(self, job_id: str, pngs: list[bytes], steps: int) -> dict[str, Any]:
        data = ([{"url": self.url(job_id, i)} for i in range(len(pngs))]
                if self.response_format == "url" else [{"b64_json": self.b64(p)} for p in pngs])
        return {"created": int(time.time()), "data": data, "background": BACKGROUND,
                "output_format": self.format, "size": self.size, "usage": usage(steps)}

    def event(self, kind: str, image: bytes, source_format: str = "png", **extra: Any
              ) -> bytes:
        """An SSE event of `image` (a final PNG, or a snapshot frame in `source_format`) in
        the requested `output_format`; `extra` adds or overrides fields (a partial image's
        `size` is its own: a preview can be smaller than the model's images)."""
        doc = {"type": f"{self.kind}.{kind}", "b64_json": self.b64(image, source_format),
               "background": BACKGROUND, "created_at": int(time.time()),
               "output_format": self.format, "quality": QUALITY, "size": self.size, **extra}
        return sse(doc["type"], doc)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
