"""A job's event stream: the event kinds, one typed event per kind, and the one codec of a
stream entry, for the worker that writes it and the API that relays it.

On the wire an entry is `type`, `data` (a JSON object) and, for snapshots, `image` (the
encoded frame). `Event` is that entry as it is (the generic form, what the API relays
without parsing). The typed events (`Started`, `Progress`, `Snapshot`, `FinalImage`, `Done`,
`Error`, `Canceled`, `Requeued`) say what each field of each kind holds, and every count of
steps says what it counts:

- `steps_per_image`: network steps of one image (the request's `steps`, plus RePaint's
  jumps), in `started`, `progress`, `snapshot` and `image`;
- `total_steps`: in `progress`, the steps of all the job's images (`num_images ×
  steps_per_image`, what `steps_done` counts toward). Frame events (`snapshot`, `image`)
  also carry `total_steps`, written before they had `steps_per_image`, equal to it there:
  a documented alias kept for readers of that field (`FRAME_ALIASES`);
- `steps` in `started`: the same alias of `steps_per_image`; in `done`: the request's
  `steps` (without RePaint's jumps), as the job's RQ result says.

`encode(event)` / `decode(fields)` and `Event.to_fields` / `Event.from_fields` are the same
codec: a typed event is written through its generic form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, ClassVar, Self


class EventType(StrEnum):
    STARTED = "started"      # a worker took the job
    PROGRESS = "progress"    # steps done / total
    SNAPSHOT = "snapshot"    # an intermediate frame of one image (PNG, WebP or JPEG)
    IMAGE = "image"          # a final image is stored under image_key(job, index)
    DONE = "done"            # every image is stored; the job succeeded
    ERROR = "error"          # the job failed; data.message says why
    CANCELED = "canceled"    # the job was canceled; its slots are free
    REQUEUED = "requeued"    # the worker stopped; the job went back to its queue


_JSON = json.JSONEncoder(separators=(",", ":"))     # one encoder, not one per entry

TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR, EventType.CANCELED})

# Old wire names a typed event still writes beside the field they repeat, and reads when
# that field is missing (entries written before it): alias → field.
FRAME_ALIASES = {"total_steps": "steps_per_image"}       # snapshot and image events
STARTED_ALIASES = {"steps": "steps_per_image"}


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream, as it is on the wire (the generic form)."""

    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None   # snapshot frames only: the encoded frame (data["format"])

    def to_fields(self) -> dict[str, str | bytes]:
        fields: dict[str, str | bytes] = {"type": str(self.type),
                                          "data": _JSON.encode(self.data)}
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

    def typed(self) -> TypedEvent:
        """This entry as its kind's typed event (KeyError/TypeError/ValueError if its data
        does not fit the kind)."""
        return KINDS[self.type].from_event(self)

    @property
    def event(self) -> Event:
        """Itself: what `Batch.event` and `encode` take, typed or generic."""
        return self


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """The names of a dataclass's fields, in order (read once per class)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _aliased(data: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """`data` with each alias written beside its field."""
    return {**data, **{a: data[f] for a, f in aliases.items() if f in data}}


def _unaliased(data: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """`data` read back: each field from itself, else from its alias; aliases dropped."""
    out = {k: v for k, v in data.items() if k not in aliases}
    for a, f in aliases.items():
        if f not in out and a in data:
            out[f] = data[a]
    return out


class _Typed:
    """What every typed event shares: its kind, its generic form and back."""

    type: ClassVar[EventType]

    def data(self) -> dict[str, Any]:
        """Its fields but those None, as they are: no deep copy (the data is encoded at
        once), no `dataclasses.fields` per call (an event's entry: ~5 µs, not ~9-12)."""
        return {k: v for k in _field_names(type(self)) if (v := getattr(self, k)) is not None}

    @property
    def event(self) -> Event:
        """The generic form: what goes on the wire."""
        return Event(self.type, self.data())

    def to_fields(self) -> dict[str, str | bytes]:
        return self.event.to_fields()

    @classmethod
    def from_event(cls, event: Event) -> Self:
        if event.type != cls.type:
            raise ValueError(f"a {event.type} event is not {cls.type}")
        names = cls.__dataclass_fields__  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in event.data.items() if k in names})


@dataclass(frozen=True)
class Started(_Typed):
    """A worker took the job and admitted it into its batch."""

    type: ClassVar[EventType] = EventType.STARTED
    worker: str = ""
    model: str = ""
    num_images: int = 0
    steps_per_image: int = 0          # network steps of one image (RePaint's jumps included)
    queue_wait_s: float = 0.0         # seconds from enqueue to start
    resumed_at: int | None = None     # continued from a resume state at this many steps

    def data(self) -> dict[str, Any]:
        return _aliased(super().data(), STARTED_ALIASES)

    @classmethod
    def from_event(cls, event: Event) -> Started:
        return super().from_event(Event(event.type, _unaliased(event.data, STARTED_ALIASES)))


@dataclass(frozen=True)
class Progress(_Typed):
    """Steps done so far, over all the job's images (throttled; the last one at the end)."""

    type: ClassVar[EventType] = EventType.PROGRESS
    steps_done: int = 0               # summed over the job's images
    total_steps: int = 0              # all images: num_images × steps_per_image
    images_done: int = 0
    num_images: int = 0
    image_steps: list[int] | None = None   # steps each image has done
    steps_per_image: int | None = None     # None: written before it was


@dataclass(frozen=True)
class Snapshot(_Typed):
    """An intermediate frame of one image: x̂0 or x_t after `step` of its steps, encoded
    as `format` at `size` pixels a side; `dropped` frames of this image just before it
    were skipped by a writer that had fallen behind (0 is not written)."""

    type: ClassVar[EventType] = EventType.SNAPSHOT
    index: int = 0
    step: int = 0                     # steps this image has done
    steps_per_image: int = 0          # written as `total_steps` too (FRAME_ALIASES)
    kind: str = "x0"                  # x0 | xt
    format: str = "png"               # png | webp | jpeg
    size: int = 0
    dropped: int = 0
    image: bytes = b""                # the encoded frame (the entry's `image` field)

    def data(self) -> dict[str, Any]:
        d = {"index": self.index, "step": self.step, "steps_per_image": self.steps_per_image,
             "kind": self.kind, "format": self.format, "size": self.size}
        if self.dropped:
            d["dropped"] = self.dropped
        return _aliased(d, FRAME_ALIASES)

    @property
    def event(self) -> Event:
        return Event(self.type, self.data(), image=self.image)

    @classmethod
    def from_event(cls, event: Event) -> Snapshot:
        # (no `format`: written before frame formats, a PNG: the field's default)
        typed: Snapshot = super().from_event(
            Event(event.type, _unaliased(event.data, FRAME_ALIASES)))
        return typed if event.image is None else replace(typed, image=event.image)


@dataclass(frozen=True)
class FinalImage(_Typed):
    """A final image (PNG) is stored under `image_key(job, index)`."""

    type: ClassVar[EventType] = EventType.IMAGE
    index: int = 0
    step: int = 0                     # = steps_per_image
    steps_per_image: int = 0          # written as `total_steps` too (FRAME_ALIASES)

    def data(self) -> dict[str, Any]:
        return _aliased(super().data(), FRAME_ALIASES)

    @classmethod
    def from_event(cls, event: Event) -> FinalImage:
        return super().from_event(Event(event.type, _unaliased(event.data, FRAME_ALIASES)))


@dataclass(frozen=True)
class Done(_Typed):
    """Every image is stored; the job succeeded. The data is its RQ result (`JobResult`)."""

    type: ClassVar[EventType] = EventType.DONE
    model: str = ""
    num_images: int = 0
    seed: int = 0
    sampler: str = ""
    steps: int = 0                    # the request's steps (RePaint's jumps not counted)
    image_keys: list[str] = field(default_factory=list)
    queue_wait_s: float = 0.0
    run_s: float = 0.0

    @classmethod
    def of(cls, result: JobResult) -> Done:
        return cls(**result.to_dict())


@dataclass(frozen=True)
class Error(_Typed):
    """The job failed and is not retried (a retried one ends its run with `requeued`)."""

    type: ClassVar[EventType] = EventType.ERROR
    message: str = ""


@dataclass(frozen=True)
class Canceled(_Typed):
    """The job was canceled, stopped or deleted; its slots are free."""

    type: ClassVar[EventType] = EventType.CANCELED
    message: str = ""


@dataclass(frozen=True)
class Requeued(_Typed):
    """The job went back to its queue: a failure RQ retries (`message`), or a worker that
    stopped past its grace period (`worker`)."""

    type: ClassVar[EventType] = EventType.REQUEUED
    message: str | None = None
    worker: str | None = None
    saved_at: int | None = None       # its resume state was stored at this many steps


TypedEvent = Started | Progress | Snapshot | FinalImage | Done | Error | Canceled | Requeued
KINDS: dict[EventType, type[TypedEvent]] = {k.type: k for k in (
    Started, Progress, Snapshot, FinalImage, Done, Error, Canceled, Requeued)}
assert set(KINDS) == set(EventType), "one typed event per kind"


def encode(event: Event | TypedEvent) -> dict[str, str | bytes]:
    """A stream entry's fields (`Event.to_fields` of its generic form)."""
    return event.event.to_fields()


def decode(fields: dict[bytes | str, bytes | str]) -> TypedEvent:
    """A stream entry as its typed event (`Event.from_fields`, then `Event.typed`)."""
    return Event.from_fields(fields).typed()


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
        """Its fields (a copy of `image_keys`), without `dataclasses.asdict`'s recursion."""
        out = {k: getattr(self, k) for k in _field_names(JobResult)}
        out["image_keys"] = list(self.image_keys)
        return out
