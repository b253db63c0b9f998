"""Request and response bodies of the API, as the OpenAPI schema documents them."""

from __future__ import annotations

import re
from contextvars import ContextVar
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from contract.inputs import MAX_BASE64_CHARS, MAX_INPUT_BYTES
from contract.limits import INPUT_FIELDS, MODEL_NAME_PATTERN
from contract.rules import rules_schema
from contract.spec import GenerationSpec

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

EXAMPLE_REQUEST = {"model": "mnist", "num_images": 4, "sampler": "dpm++2m", "steps": 25,
                   "seed": 42, "snapshot_every": 5, "class_label": 7, "guidance_scale": 2.0}


# A webhook URL as the schema states it and the API accepts it: http(s), a host name or an
# IPv4 address (no user info, no IPv6 literal), a port 0-65535, then printable ASCII only
# (no spaces, control or non-ASCII characters: percent-encode them, punycode host names).
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_PORT = "6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}"
WEBHOOK_PATTERN = (f"^https?://{_LABEL}(?:\\.{_LABEL})*\\.?(?::(?:{_PORT}))?"
                   "(?:[/?#][!-~]*)?$")
_WEBHOOK = re.compile(WEBHOOK_PATTERN)


def _webhook_url(url: str) -> str:
    if not _WEBHOOK.fullmatch(url):
        raise ValueError("must be an http:// or https:// URL: a host name or IPv4 address, an "
                         "optional port (0-65535), no user info, and no spaces, control or "
                         "non-ASCII characters")
    try:                            # parsed as the allow-list check and the sender do
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"is not a valid URL: {e}") from None
    if not host:
        raise ValueError("is not a valid URL: it has no host")
    return url


WebhookUrl = Annotated[str, Field(max_length=2048, json_schema_extra={
    "pattern": WEBHOOK_PATTERN}), AfterValidator(_webhook_url)]

# The rules between fields that the API enforces (contract/rules.py, the validators'
# own), stated in the schema so that clients and fuzzers see them: JSON Schema 2020-12
# if/then, generated from the rules.
CROSS_FIELD_RULES = rules_schema(GenerationSpec)


# An input image in a JSON body: base64, or a data: URL (what a browser's FileReader gives).
ImageData = Annotated[str, Field(min_length=1, max_length=MAX_BASE64_CHARS, description=(
    "an image (PNG, JPEG, WebP, GIF, BMP or TIFF; one frame) as base64 or a `data:` URL, at "
    f"most {MAX_INPUT_BYTES} bytes; fitted to the model as its training data is (grey/RGB, "
    "resized and centre-cropped). In `multipart/form-data`, a file part of the same name"))]


class GenerationRequest(GenerationSpec):
    """A generation request: the worker's spec plus what only the API acts on.
    `guidance_scale` other than 1 needs a `class_label`; `eta` other than 0 needs the `ddim`
    sampler (the `allOf` rules). With `init_image`: img2img (SDEdit); with a `mask` too:
    inpainting (RePaint); with `interpolate_to`: `num_images` frames from one image to the
    other (Ho et al. 2020 §4.4)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "examples": [EXAMPLE_REQUEST], "allOf": CROSS_FIELD_RULES})

    init_image: ImageData | None = None  # type: ignore[assignment]
    mask: Annotated[ImageData | None, Field(description=(
        "inpainting: the region to generate is white (grey/RGB ≥ 128) or, in an image with "
        "transparency, fully transparent (OpenAI's convention); the rest is kept exactly. "
        "Same width and height as init_image"))] = None  # type: ignore[assignment]
    interpolate_to: Annotated[ImageData | None, Field(description=(
        "interpolation: the second image; `num_images` frames go from init_image (first) to "
        "this one (last)"))] = None  # type: ignore[assignment]
    webhook: Annotated[WebhookUrl | None, Field(
        description="URL POSTed (job id and status) when the job succeeds or fails; its host "
                    "must be on the service's allow-list (DDPM_WEBHOOK_ALLOW_HOSTS)")] = None

    def spec(self, inputs: dict[str, str] | None = None) -> GenerationSpec:
        """The worker's spec; `inputs` names the fitted input images by digest."""
        return GenerationSpec(**self.model_dump(exclude={"webhook", *INPUT_FIELDS}),
                              **(inputs or {}))

    def images(self) -> dict[str, str]:
        """The input images sent: field → base64 text."""
        return {f: getattr(self, f) for f in INPUT_FIELDS if getattr(self, f) is not None}


# What a POST body without `model` gets: (the one served model, or None and why there is
# none to give). Set for each POST before its body is validated (the route's dependency
# reads the served models), so that a body naming no model is refused exactly as one naming
# a bad model would be, in the same 422 and in field order.
SOLE_MODEL: ContextVar[tuple[str | None, str]] = ContextVar(
    "sole_model", default=(None, "model is required"))


class NewGeneration(GenerationRequest):
    """The body of `POST /v1/generations`: a GenerationRequest whose `model` may be left
    out while exactly one model is served (SOLE_MODEL)."""

    # Published as `GenerationRequest`, the request schema clients know (only this class
    # is a body, so the name is not taken twice).
    __qualname__ = "GenerationRequest"
    model_config = ConfigDict(title="GenerationRequest")

    model: Annotated[str | None, Field(  # type: ignore[assignment]
        pattern=MODEL_NAME_PATTERN, validate_default=True,
        description="served model name; may be left out while exactly one model is served "
                    "(`GET /v1/models`)")] = None

    @field_validator("model", mode="before")
    @classmethod
    def _sole_model(cls, value: object) -> object:
        if value is None:
            sole, refusal = SOLE_MODEL.get()
            if sole is None:
                raise ValueError(refusal)
            return sole
        return value


class Progress(BaseModel):
    steps_done: int = Field(description="denoising steps done, summed over the images")
    total_steps: int = Field(description="num_images × steps_per_image")
    fraction: float = Field(ge=0, le=1)
    images_done: int
    num_images: int
    steps_per_image: int = Field(description="network steps per image: `steps`, plus "
                                 "RePaint's jumps when resampling")
    image_steps: list[int] = Field(description="steps done by each image")


class Links(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    events: str
    websocket: str = Field(description="the same events over a WebSocket (`ws://` or "
                           "`wss://` at this path; see the API description)")
    images: list[str]
    grid: str
    animation: str


class Generation(BaseModel):
    """A generation job as the API reports it."""

    id: str
    status: Status
    model: str
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = Field(
        None, description="jobs ahead of this one while queued (0: next to run)")
    progress: Progress
    images: list[str] = Field(description="URLs of the final images, once stored")
    error: str | None = None
    request: GenerationSpec
    links: Links
    trace_id: str | None = Field(
        None, description="the job's trace (32 hex digits) when the server traces "
                          "(DDPM_OTLP_ENDPOINT): look it up in Tempo or Jaeger")


class GenerationList(BaseModel):
    """A page of the caller's generations, newest first."""

    generations: list[Generation]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; `null` at the end. A page filtered "
                    "by status can hold fewer than `limit` items, even none, and still have "
                    "a cursor: follow it until it is `null`")


class ModelCard(BaseModel):
    """A model that live workers serve."""

    name: str
    image_size: int
    in_channels: int
    num_timesteps: int
    num_classes: int = 0
    class_names: list[str] = []
    parameters: int = 0
    workers: int = Field(description="live workers serving it")
    queued: int = Field(description="jobs waiting in its queues")


class ModelList(BaseModel):
    """The served models, and what any request to them may choose."""

    models: list[ModelCard]
    samplers: list[str] = Field(
        description="the `sampler` values a generation accepts (the web page lists these)")


class Health(BaseModel):
    status: Literal["ok", "unready"]
    checks: dict[str, Any] = {}
