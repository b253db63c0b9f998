"""A job's event stream: the event kinds and the one codec of a stream entry, for the
worker that writes it and the API that relays it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


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
