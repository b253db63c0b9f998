"""The job contract between the API and the workers: request spec, Redis names, events.

Both sides import this one torch-free module, so what the API validates and enqueues is
exactly what a worker reads, and the event stream has one schema. Keep it free of torch,
rq and anything heavy: the API image has none of those at import time.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

# ---------------------------------------------------------------------------------------
# Limits: every request field is bounded.

MAX_IMAGES = 64                 # images per request
MAX_STEPS = 1000                # denoising steps (also capped by the model's T)
MAX_SNAPSHOT_EVERY = MAX_STEPS
MAX_GUIDANCE = 20.0
MAX_CLASS_LABEL = 9999
MAX_SEED = 2**63 - 1
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_JUMP_LENGTH = 100           # RePaint resampling: timesteps per jump back
MAX_JUMP_N_SAMPLE = 20          # RePaint resampling: passes over each jump

Sampler = Literal["ddpm", "ddim", "dpm++2m"]
SnapshotKind = Literal["x0", "xt"]
SnapshotFormat = Literal["png", "webp", "jpeg"]
SNAPSHOT_FORMATS: tuple[SnapshotFormat, ...] = get_args(SnapshotFormat)
LOSSY_FORMATS: frozenset[str] = frozenset({"webp", "jpeg"})
MIN_SNAPSHOT_SIZE = 8           # pixels a side of a preview frame
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")   # dequeue order

# Image-conditioned generation. The images travel beside the job, fitted to the model, as
# PNGs under input_key(job, field) (worker/inputs.py fits them); the spec names each by its
# digest, so the RQ payload stays small JSON.
Kind = Literal["generate", "img2img", "inpaint", "interpolate"]
InputField = Literal["init_image", "mask", "interpolate_to"]
INPUT_FIELDS: tuple[InputField, ...] = get_args(InputField)
INPUT_REF_PATTERN = r"^sha256:[0-9a-f]{64}$"
# strength when a request leaves it out: SDEdit's usual 0.75, the paper's t = 500 of 1000
# for interpolation (Ho et al. 2020 §4.4), and pure noise for inpainting (RePaint).
DEFAULT_STRENGTH: dict[Kind, float] = {"generate": 1.0, "img2img": 0.75, "inpaint": 1.0,
                                       "interpolate": 0.5}
InputRef = Annotated[str, Field(pattern=INPUT_REF_PATTERN,
                                description="digest of the fitted input image")]


# Snapshot frames ("previews") cost what they are worth: lossless at the image's own size
# for small images, downscaled lossy frames for large ones (a 256x256 RGB frame is 196 KB of
# pixels, ~175 KB as PNG and ~8 KB as a 128x128 JPEG; BENCHMARKS.md). Final images are
# always lossless PNG.
LOSSLESS_PREVIEW_MAX = 64       # images up to this side get PNG frames at full size
DEFAULT_PREVIEW_SIZE = 128      # larger ones: frames this big, lossy
DEFAULT_PREVIEW_FORMAT: SnapshotFormat = "jpeg"   # 10x faster to encode than WebP, as small
DEFAULT_PREVIEW_QUALITY = 75
MAX_PREVIEW_SIDE = 1024
# Bytes per pixel of a lossy frame by quality, measured on uniform noise (the costliest
# content: x_t frames are mostly noise) at 64x64, the larger of grey and RGB; interpolated.
# PNG is estimated at its raw pixels plus 4 %.
LOSSY_BYTES_PER_PIXEL: dict[str, tuple[tuple[int, float], ...]] = {
    "jpeg": ((10, 0.27), (25, 0.39), (50, 0.57), (75, 0.75), (90, 1.05), (100, 2.13)),
    "webp": ((10, 0.36), (25, 0.48), (50, 0.60), (75, 0.72), (90, 0.96), (100, 2.67)),
}
FRAME_HEADER_BYTES = 1024       # a frame's container overhead (JPEG tables, PNG chunks)


@dataclass(frozen=True)
class Preview:
    """How a job's snapshot frames are made: side in pixels, format, quality (lossy only)."""

    size: int
    format: SnapshotFormat
    quality: int = 0

    @classmethod
    def default(cls, image_size: int) -> Preview:
        if image_size <= LOSSLESS_PREVIEW_MAX:
            return cls(image_size, "png")
        return cls(min(image_size, DEFAULT_PREVIEW_SIZE), DEFAULT_PREVIEW_FORMAT,
                   DEFAULT_PREVIEW_QUALITY)

    @property
    def media_type(self) -> str:
        return f"image/{self.format}"

    def frame_bytes(self, channels: int) -> int:
        """An upper estimate of one encoded frame's bytes (noise is the worst case)."""
        pixels = self.size * self.size
        if self.format == "png":
            return int(pixels * channels * 1.04) + FRAME_HEADER_BYTES
        points = LOSSY_BYTES_PER_PIXEL[self.format]
        q = min(max(self.quality, points[0][0]), points[-1][0])
        for (q0, b0), (q1, b1) in itertools.pairwise(points):
            if q <= q1:
                return int(pixels * (b0 + (b1 - b0) * (q - q0) / (q1 - q0))) \
                    + FRAME_HEADER_BYTES
        raise AssertionError("unreachable")


class SpecError(ValueError):
    """A spec that does not fit a model; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _random_seed() -> int:
    return secrets.randbits(63)


class RequestModel(BaseModel):
    """What every request body derives from (the native one and OpenAI's): unknown fields
    are refused, and no value is coerced from another JSON type (strict: `true` is not the
    integer 1, `"5"` not 5), so the API accepts exactly what its schema says; as JSON
    Schema, it takes `2.0` for an integer. Multipart text parts, strings by nature, are
    read as the values they spell (`model_validate_strings(..., strict=False)`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fixed = {k: int(v) for k, v in data.items() if type(v) is float and v.is_integer()
                 and k in cls.model_fields and _takes_int(cls.model_fields[k].annotation)}
        return {**data, **fixed} if fixed else data


def _takes_int(annotation: Any) -> bool:
    return annotation is int or int in get_args(annotation)


class GenerationSpec(RequestModel):
    """One generation request, as the API accepts it and the worker runs it."""

    model_config = ConfigDict(frozen=True)

    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN, description="served model name")]
    num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    sampler: Sampler = "dpm++2m"
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS, description=(
        f"denoising steps; {MAX_STEPS} at most, and depending on the model: at most its "
        "`num_timesteps` (`GET /v1/models`), with an init_image at most "
        "ceil(strength × num_timesteps) (a 422 names `steps` otherwise)"))] = 25
    eta: Annotated[float, Field(ge=0.0, le=1.0, description="DDIM η; only with ddim")] = 0.0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(default_factory=_random_seed)
    snapshot_every: Annotated[int, Field(ge=0, le=MAX_SNAPSHOT_EVERY,
                                         description="emit a frame every k steps; 0 = none")] = 0
    snapshot_kind: SnapshotKind = "x0"
    snapshot_size: Annotated[int | None, Field(
        ge=MIN_SNAPSHOT_SIZE, le=MAX_PREVIEW_SIDE, description=(
            "side in pixels of the snapshot frames (downscaled; at most the model's image "
            f"size); default: the image size up to {LOSSLESS_PREVIEW_MAX}, else "
            f"{DEFAULT_PREVIEW_SIZE}"))] = None
    snapshot_format: Annotated[SnapshotFormat | None, Field(description=(
        f"snapshot frames as png, webp or jpeg; default: png up to {LOSSLESS_PREVIEW_MAX} "
        "pixels a side, else jpeg. Final images are always lossless PNG"))] = None
    snapshot_quality: Annotated[int | None, Field(ge=1, le=100, description=(
        f"quality of webp and jpeg snapshot frames (default {DEFAULT_PREVIEW_QUALITY})"))] = None
    class_label: Annotated[int | None, Field(ge=0, le=MAX_CLASS_LABEL, description=(
        "a class of a class-conditional model; depends on the model: below its "
        f"`num_classes` (`GET /v1/models`; {MAX_CLASS_LABEL} is the bound for any model), "
        "and null for an unconditional one (a 422 names `class_label` otherwise)"))] = None
    guidance_scale: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)] = 1.0
    priority: Priority = "normal"
    init_image: InputRef | None = None
    mask: InputRef | None = None
    interpolate_to: InputRef | None = None
    strength: Annotated[float | None, Field(
        gt=0.0, le=1.0, description="how far into the noise the input image goes "
        "(SDEdit): 1 = pure noise; default by kind: img2img 0.75, interpolation 0.5, "
        "inpainting 1")] = None
    jump_length: Annotated[int, Field(ge=1, le=MAX_JUMP_LENGTH, description=(
        "RePaint resampling (with a mask): timesteps of each jump back"))] = 10
    jump_n_sample: Annotated[int, Field(ge=1, le=MAX_JUMP_N_SAMPLE, description=(
        "RePaint resampling (with a mask): passes over each jump; 1 = none. Each extra "
        "pass adds 2·jump_length steps per jump"))] = 1

    # Field validators (not one model validator) so an error names its field: the API
    # reports it as such. Each reads fields declared before it.
    @field_validator("eta")
    @classmethod
    def _eta_ddim_only(cls, eta: float, info: ValidationInfo) -> float:
        sampler = info.data.get("sampler")
        if eta != 0.0 and sampler is not None and sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only, not {sampler!r}")
        return eta

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_needs_label(cls, scale: float, info: ValidationInfo) -> float:
        if scale != 1.0 and info.data.get("class_label") is None and "class_label" in info.data:
            raise ValueError("guidance_scale needs a class_label (classifier-free guidance)")
        return scale

    @field_validator("snapshot_quality")
    @classmethod
    def _quality_lossy_only(cls, quality: int | None, info: ValidationInfo) -> int | None:
        if quality is not None and info.data.get("snapshot_format") == "png":
            raise ValueError("snapshot_quality applies to webp and jpeg frames, not png")
        return quality

    @field_validator("mask", "interpolate_to", "strength")
    @classmethod
    def _needs_init_image(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and info.data.get("init_image") is None \
                and "init_image" in info.data:
            raise ValueError(f"{info.field_name} needs an init_image")
        return value

    @field_validator("interpolate_to")
    @classmethod
    def _interpolation(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            if info.data.get("mask") is not None:
                raise ValueError("interpolate_to and mask exclude each other")
            if info.data.get("num_images", 2) < 2:
                raise ValueError("an interpolation needs num_images >= 2 (its frames)")
        return value

    @field_validator("jump_length", "jump_n_sample")
    @classmethod
    def _resampling_needs_mask(cls, value: int, info: ValidationInfo) -> int:
        default = cls.model_fields[info.field_name or ""].default
        if value != default and info.data.get("mask") is None and "mask" in info.data:
            raise ValueError(f"{info.field_name} applies to inpainting (a mask) only")
        return value

    @property
    def kind(self) -> Kind:
        if self.init_image is None:
            return "generate"
        if self.mask is not None:
            return "inpaint"
        return "interpolate" if self.interpolate_to is not None else "img2img"

    @property
    def effective_strength(self) -> float:
        return DEFAULT_STRENGTH[self.kind] if self.strength is None else self.strength

    @property
    def inputs(self) -> dict[str, str]:
        """The input images this job reads: field → digest."""
        return {f: getattr(self, f) for f in INPUT_FIELDS if getattr(self, f) is not None}

    @property
    def resampling(self) -> bool:
        return self.mask is not None and self.jump_n_sample > 1

    @property
    def steps_per_image(self) -> int:
        """Network steps each image takes: `steps`, plus RePaint's jumps back and forth
        (each of the jump_n_sample − 1 extra passes over a jump is jump_length steps up and
        as many down; jumps start every jump_length steps, as diffusers'
        RePaintScheduler)."""
        if not self.resampling:
            return self.steps
        jumps = len(range(0, self.steps - self.jump_length, self.jump_length))
        return self.steps + 2 * self.jump_length * (self.jump_n_sample - 1) * jumps

    @property
    def total_steps(self) -> int:
        """Network steps over all images: what progress counts toward."""
        return self.num_images * self.steps_per_image

    @property
    def snapshot_frames(self) -> int:
        """Snapshot frames the job emits: every `snapshot_every` steps of each image, except
        at its last step (the final image)."""
        if not self.snapshot_every:
            return 0
        return self.num_images * ((self.steps_per_image - 1) // self.snapshot_every)

    def preview(self, image_size: int) -> Preview:
        """The snapshot frames' size, format and quality for a model of `image_size`: what
        the request asked for, the rest by default (`Preview.default`)."""
        d = Preview.default(image_size)
        fmt = self.snapshot_format or d.format
        quality = (self.snapshot_quality or DEFAULT_PREVIEW_QUALITY) if fmt in LOSSY_FORMATS \
            else 0
        return Preview(size=min(self.snapshot_size or d.size, image_size), format=fmt,
                       quality=quality)

    def snapshot_bytes(self, info: ModelInfo) -> int:
        """The bytes of this job's snapshot frames on a model like `info`, estimated at their
        size and format (`Preview.frame_bytes`: an upper estimate)."""
        frames = self.snapshot_frames
        if not frames:
            return 0
        return frames * self.preview(info.image_size).frame_bytes(info.in_channels)

    def check_stream_budget(self, info: ModelInfo, budget: int) -> None:
        """SpecError if this job's snapshot frames alone would exceed `budget` bytes (a job
        stream's byte budget), as `snapshot_bytes` estimates them."""
        need = self.snapshot_bytes(info)
        if need > budget:
            frames, p = self.snapshot_frames, self.preview(info.image_size)
            raise SpecError("snapshot_every", (
                f"{frames} snapshot frames of {p.size}x{p.size} {p.format} need about "
                f"{need / 2**20:.1f} MiB, over the {budget / 2**20:.1f} MiB a job's event "
                "stream holds: raise snapshot_every, or lower num_images, snapshot_size or "
                "snapshot_quality, or use snapshot_format jpeg/webp"))

    def check_model(self, info: ModelInfo) -> None:
        """Raise SpecError (a ValueError naming the field) if this spec does not fit."""
        if self.snapshot_size is not None and self.snapshot_size > info.image_size:
            raise SpecError("snapshot_size", f"{self.snapshot_size} exceeds the model's "
                            f"{info.image_size}-pixel images")
        if self.steps > info.num_timesteps:
            raise SpecError("steps", f"{self.steps} exceeds the model's {info.num_timesteps} "
                            "diffusion timesteps")
        start = start_timestep(self.effective_strength, info.num_timesteps)
        if self.steps > start + 1:
            raise SpecError("steps", f"{self.steps} steps do not fit in the {start + 1} "
                            f"timesteps that strength {self.effective_strength} leaves "
                            f"(ceil(strength × {info.num_timesteps})); ask for fewer steps or "
                            "a higher strength")
        if self.class_label is not None:
            if not info.num_classes:
                raise SpecError("class_label", f"model {info.name!r} is unconditional")
            if self.class_label >= info.num_classes:
                raise SpecError("class_label", f"must be < {info.num_classes} for model "
                                f"{info.name!r}")


def start_timestep(strength: float, num_timesteps: int) -> int:
    """t0 = ⌈strength · T⌉ − 1, the timestep an input image is noised to (SDEdit); models'
    sampler uses the same (a test ties them). Rounded first so that 0.7 · 1000 is 700."""
    return max(0, math.ceil(round(strength * num_timesteps, 6)) - 1)


@dataclass(frozen=True)
class ModelInfo:
    """What a worker advertises about a model it serves."""

    name: str
    image_size: int
    in_channels: int
    num_timesteps: int
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    parameters: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------------------------------
# RQ and Redis names.

JOB_FUNC = "worker.tasks.generate"   # what RQ records as the job's function
SERIALIZER = "json"                  # RQ serializer alias: payloads are data, never pickles
PREFIX = "ddpm"


def queue_name(model: str, priority: Priority = "normal") -> str:
    """One RQ queue per (model, priority): a job only reaches workers holding its model."""
    return f"{PREFIX}.{model}.{priority}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def input_key(job_id: str, field: str) -> str:
    """A job's fitted input image (INPUT_FIELDS), written with the job, same TTL."""
    return f"{PREFIX}:input:{job_id}:{field}"


def image_key(job_id: str, index: int) -> str:
    return f"{PREFIX}:image:{job_id}:{index}"


def worker_key(worker_name: str) -> str:
    return f"{PREFIX}:workers:{worker_name}"


# Idle workers block on their models' wake lists (BLPOP) instead of polling the queues:
# every enqueue of ours pushes a token (`wake_commands`), bounded and expiring, so a token
# nobody waits for costs nothing. Jobs enqueued by other tools (plain RQ) push none: an idle
# worker still looks at the queues every WAKE_TIMEOUT seconds.
WAKE_MAXLEN = 64
WAKE_TTL = 60
WAKE_TIMEOUT = 0.25


def wake_key(model: str) -> str:
    return f"{PREFIX}:wake:{model}"


def wake_commands(pipe: Any, model: str) -> None:
    """Queue on `pipe` the writes that wake one idle worker of `model`."""
    key = wake_key(model)
    pipe.rpush(key, 1)
    pipe.ltrim(key, -WAKE_MAXLEN, -1)
    pipe.expire(key, WAKE_TTL)


# Live workers by name, scored by when their advertisement expires: readers find the
# advertisements without SCANning the whole keyspace (a SCAN per POST grew with every job's
# keys: 47 ms per submission with 100k keys in Redis, bench/api_overhead.py --prefill-keys).
WORKERS_INDEX = f"{PREFIX}:workers"


def advertise_worker(redis: Any, name: str, doc: str, ttl: int, now: float) -> None:
    """Publish (or renew) a worker's advertisement `doc` (JSON) for `ttl` seconds."""
    with redis.pipeline(transaction=True) as p:
        p.set(worker_key(name), doc, ex=ttl)
        p.zadd(WORKERS_INDEX, {name: now + ttl})
        p.expire(WORKERS_INDEX, ttl)      # gone with the last worker
        p.execute()


def withdraw_worker(redis: Any, name: str) -> None:
    with redis.pipeline(transaction=True) as p:
        p.delete(worker_key(name))
        p.zrem(WORKERS_INDEX, name)
        p.execute()


def live_worker_keys(redis: Any, now: float) -> list[str]:
    """Advertisement keys of workers whose advertisement has not expired at `now` (epoch s);
    drops the expired names from the index on the way."""
    with redis.pipeline(transaction=False) as p:
        p.zremrangebyscore(WORKERS_INDEX, "-inf", now)
        p.zrange(WORKERS_INDEX, 0, -1)
        _, names = p.execute()
    return [worker_key(n.decode() if isinstance(n, bytes) else n) for n in names]


# ---------------------------------------------------------------------------------------
# The event stream: one Redis Stream per job; each entry is {"type", "data" (JSON), "png"?}.

# Entries a job's stream keeps (XADD MAXLEN ~): the default of DDPM_STREAM_MAXLEN, which
# the workers' and the API's settings both read, so both trim alike.
STREAM_MAXLEN = 2000
# Bytes of snapshot frames a job's stream keeps (DDPM_STREAM_MAX_BYTES, both sides): past
# it the oldest frames are deleted as new ones arrive, and the API refuses a request whose
# frames alone would exceed it (GenerationSpec.check_stream_budget).
STREAM_MAX_BYTES = 8 * 2**20


def frames_key(job_id: str) -> str:
    """The job's snapshot ledger: a list of "<stream id> <bytes>", oldest first, and a
    counter of their bytes (`frames_key(job) + ":bytes"`), so frames are trimmed by bytes."""
    return f"{PREFIX}:frames:{job_id}"


# Ended jobs whose snapshot frames are deleted at their score (epoch seconds): snapshot
# entries expire `snapshot_ttl` after the job ends, sooner than its results.
FRAMES_EXPIRING = f"{PREFIX}:frames:expiring"


class EventType(StrEnum):
    STARTED = "started"      # a worker took the job
    PROGRESS = "progress"    # steps done / total
    SNAPSHOT = "snapshot"    # an intermediate frame of one image (PNG)
    IMAGE = "image"          # a final image is stored under image_key(job, index)
    DONE = "done"            # every image is stored; the job succeeded
    ERROR = "error"          # the job failed; data.message says why
    CANCELED = "canceled"    # the job was canceled; its slots are free
    REQUEUED = "requeued"    # the worker stopped; the job went back to its queue


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR, EventType.CANCELED})


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream."""

    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None   # snapshot frames only: the encoded frame (data["format"])

    def to_fields(self) -> dict[str, str | bytes]:
        fields: dict[str, str | bytes] = {"type": str(self.type),
                                          "data": json.dumps(self.data, separators=(",", ":"))}
        if self.image is not None:
            fields["image"] = self.image
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> Event:
        def text(v: bytes | str) -> str:
            return v.decode() if isinstance(v, bytes) else v

        f = {text(k): v for k, v in fields.items()}
        image = f.get("image", f.get("png"))       # "png": written before frame formats
        return cls(type=EventType(text(f["type"])), data=json.loads(text(f.get("data", "{}"))),
                   image=image.encode() if isinstance(image, str) else image)


@dataclass(frozen=True)
class JobResult:
    """What a finished job returns through RQ (its images live under image_key)."""

    model: str
    num_images: int
    seed: int
    sampler: str
    steps: int
    image_keys: list[str]
    queue_wait_s: float
    run_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
