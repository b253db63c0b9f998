"""One generation request, as the API accepts it and the worker runs it, and what a
worker says of the models it serves. Torch-free: the API, `ddpm sample` and the worker
validate with the same code."""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .limits import (
    DEFAULT_STRENGTH,
    INPUT_FIELDS,
    LOSSY_FORMATS,
    MAX_CLASS_LABEL,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_JUMP_LENGTH,
    MAX_JUMP_N_SAMPLE,
    MAX_PREVIEW_SIDE,
    MAX_SEED,
    MAX_SNAPSHOT_EVERY,
    MAX_STEPS,
    MIN_SNAPSHOT_SIZE,
    MODEL_NAME_PATTERN,
    InputRef,
    Kind,
    Priority,
    Sampler,
    SnapshotFormat,
    SnapshotKind,
)
from .preview import (
    DEFAULT_PREVIEW_QUALITY,
    DEFAULT_PREVIEW_SIZE,
    LOSSLESS_PREVIEW_MAX,
    Preview,
)
from .rules import RULE_FIELDS, check_rule, check_rule_order


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
        ints = _int_fields(cls)
        fixed = {k: int(v) for k, v in data.items() if type(v) is float and v.is_integer()
                 and k in ints}
        return {**data, **fixed} if fixed else data


@functools.cache
def _int_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of `cls` that take an int, found once per class: not two reads of
    `model_fields` (~0.4 µs each) per integral float at every validation."""
    return frozenset(k for k, f in cls.model_fields.items() if _takes_int(f.annotation))


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

    # The rules between fields (contract/rules.py), each checked by a validator of the
    # field it names, so the API's 422 and `ddpm sample` name that field. A rule reads
    # fields declared before its own (check_rule_order, below the class).
    @field_validator(*RULE_FIELDS)
    @classmethod
    def _rules(cls, value: Any, info: ValidationInfo) -> Any:
        check_rule(cls, info.field_name or "", value, info.data)
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


check_rule_order(GenerationSpec)


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
