"""The job contract between the API and the workers: request spec, Redis names, events.

Both sides import this one torch-free module, so what the API validates and enqueues is
exactly what a worker reads, and the event stream has one schema. Keep it free of torch,
rq and anything heavy: the API image has none of those at import time.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# ---------------------------------------------------------------------------------------
# Limits: every request field is bounded.

MAX_IMAGES = 64                 # images per request
MAX_STEPS = 1000                # denoising steps (also capped by the model's T)
MAX_SNAPSHOT_EVERY = MAX_STEPS
MAX_GUIDANCE = 20.0
MAX_CLASS_LABEL = 9999
MAX_SEED = 2**63 - 1
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

Sampler = Literal["ddpm", "ddim", "dpm++2m"]
SnapshotKind = Literal["x0", "xt"]
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")   # dequeue order


class SpecError(ValueError):
    """A spec that does not fit a model; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _random_seed() -> int:
    return secrets.randbits(63)


class GenerationSpec(BaseModel):
    """One generation request, as the API accepts it and the worker runs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN, description="served model name")]
    num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    sampler: Sampler = "dpm++2m"
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 25
    eta: Annotated[float, Field(ge=0.0, le=1.0, description="DDIM η; only with ddim")] = 0.0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(default_factory=_random_seed)
    snapshot_every: Annotated[int, Field(ge=0, le=MAX_SNAPSHOT_EVERY,
                                         description="emit a frame every k steps; 0 = none")] = 0
    snapshot_kind: SnapshotKind = "x0"
    class_label: Annotated[int | None, Field(ge=0, le=MAX_CLASS_LABEL)] = None
    guidance_scale: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE)] = 1.0
    priority: Priority = "normal"

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

    @property
    def total_steps(self) -> int:
        """Denoising steps over all images: what progress counts toward."""
        return self.num_images * self.steps

    def check_model(self, info: ModelInfo) -> None:
        """Raise SpecError (a ValueError naming the field) if this spec does not fit."""
        if self.steps > info.num_timesteps:
            raise SpecError("steps", f"{self.steps} exceeds the model's {info.num_timesteps} "
                            "diffusion timesteps")
        if self.class_label is not None:
            if not info.num_classes:
                raise SpecError("class_label", f"model {info.name!r} is unconditional")
            if self.class_label >= info.num_classes:
                raise SpecError("class_label", f"must be < {info.num_classes} for model "
                                f"{info.name!r}")


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
    png: bytes | None = None     # snapshot frames only

    def to_fields(self) -> dict[str, str | bytes]:
        fields: dict[str, str | bytes] = {"type": str(self.type),
                                          "data": json.dumps(self.data, separators=(",", ":"))}
        if self.png is not None:
            fields["png"] = self.png
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> Event:
        def text(v: bytes | str) -> str:
            return v.decode() if isinstance(v, bytes) else v

        f = {text(k): v for k, v in fields.items()}
        png = f.get("png")
        return cls(type=EventType(text(f["type"])), data=json.loads(text(f.get("data", "{}"))),
                   png=png.encode() if isinstance(png, str) else png)


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
