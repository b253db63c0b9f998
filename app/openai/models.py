"""The shapes of OpenAI's Images API as these routes accept and answer them: requests,
responses and stream events. Every bound a field shares with the native request is read
from `GenerationSpec`'s own field (`contract.rules.bounds`), never restated."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.limits import MODEL_NAME_PATTERN, Priority, Sampler
from contract.rules import bounds
from contract.spec import GenerationSpec, RequestModel

from .errors import OpenAIErrorDetail

MAX_PARTIAL_IMAGES = 3
MAX_PROMPT = 1000


def _spec(field: str, description: str) -> Any:
    """A field bounded as `GenerationSpec`'s `field` is, optional here."""
    return Field(**bounds(GenerationSpec, field), description=description)


def _range(field: str) -> str:
    b = bounds(GenerationSpec, field)
    return f"{b.get('ge', b.get('gt'))}-{b.get('le', b.get('lt'))}"


ResponseFormat = Literal["b64_json", "url"]
OutputFormat = Literal["png", "jpeg", "webp"]
SIZE_PATTERN = r"^(?:auto|[0-9]{1,5}x[0-9]{1,5})$"

_N = Annotated[int | None, _spec("num_images", f"images to generate, {_range('num_images')} "
                                               "[1]")]
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
    f"with `stream`: x̂0 previews per image (0-{MAX_PARTIAL_IMAGES}), spaced over the run"))]
_BACKGROUND = Annotated[Literal["opaque", "auto"] | None, Field(description=(
    "the images are opaque; `transparent` is not offered"))]
_QUALITY = Annotated[Literal["standard", "hd", "low", "medium", "high", "auto"] | None,
                     Field(description="accepted and ignored: `steps` sets the work")]
# Ours, as the SDK's `extra_body`.
_STEPS = Annotated[int | None, _spec("steps", "denoising steps [25]")]
_SAMPLER = Annotated[Sampler | None, Field(description="[dpm++2m]")]
_GUIDANCE = Annotated[float | None, _spec(
    "guidance_scale", "classifier-free guidance [1]; other than 1 needs a `prompt` naming a "
    "class")]
_SEED = Annotated[int | None, _spec("seed", "[random]")]
_PRIORITY = Annotated[Priority | None, Field(description="[normal]")]
_STRENGTH = Annotated[float | None, _spec(
    "strength", "how far into the noise the image goes: 1 = pure noise")]
_PROMPT = Annotated[str, Field(max_length=MAX_PROMPT, description=(
    "a class of a class-conditional model, by name or index (`7`, `airplane`); empty "
    "for unconditional generation. Depends on the model: one of its `class_names` or an "
    "index below its `num_classes` (`GET /v1/models`), else a 400 naming `prompt`"))]

# The rules across fields (JSON Schema if/then), so that clients and fuzzers see them.
URL_IS_PNG = {
    "description": "`url` images are PNG: another `output_format` needs `b64_json`",
    "if": {"required": ["response_format"],
           "properties": {"response_format": {"const": "url"}}},
    "then": {"properties": {"output_format": {"enum": ["png", None]}}}}
GUIDANCE_NEEDS_CLASS = {
    "description": "guidance_scale other than 1 needs a prompt naming a class",
    "if": {"required": ["guidance_scale"],
           "properties": {"guidance_scale": {"type": "number", "not": {"const": 1}}}},
    "then": {"required": ["prompt"], "properties": {"prompt": {"minLength": 1}}}}


class Common(RequestModel):
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


class _Output(Common):
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
        "allOf": [URL_IS_PNG, GUIDANCE_NEEDS_CLASS]})

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
    jump_length: Annotated[int | None, _spec(
        "jump_length", "RePaint resampling (with a mask) [10]")] = None
    jump_n_sample: Annotated[int | None, _spec(
        "jump_n_sample", "RePaint resampling (with a mask) [1: none]")] = None


class ImageVariationRequest(Common):
    """`POST /v1/images/variations` (multipart/form-data): img2img of `image` at
    `strength` [0.4], with no class."""

    model_config = ConfigDict(extra="forbid")

    image: str
    strength: _STRENGTH = None


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

