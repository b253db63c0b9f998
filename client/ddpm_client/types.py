"""The API's documents as small frozen dataclasses, written by hand.

They mirror the server's JSON (`GET /v1/generations/{id}`, `/v1/models`, the SSE events)
without importing any of its modules: the client installs without pydantic, torch or the
server. Unknown keys are ignored and missing ones get defaults, so a newer server does not
break an older client; `raw` keeps the document as it came.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def to_pil(image: bytes) -> Any:
    """PNG, WebP or JPEG bytes as a PIL image (the optional `images` extra: Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("PIL images need Pillow: pip install 'ddpm-client[images]'") from None
    im = Image.open(io.BytesIO(image))
    im.load()
    return im


def to_png(image: bytes, fmt: str) -> bytes:
    """`image` (in format `fmt`: png, webp or jpeg) as PNG bytes: as it is when it is one,
    else re-encoded with Pillow (ImportError without it)."""
    if fmt == "png":
        return image
    try:
        from PIL import Image  # noqa: F401
    except ImportError:
        raise ImportError(f"this frame is {fmt}, not PNG: converting it needs Pillow (pip "
                          "install 'ddpm-client[images]'), or use its `image` bytes as they "
                          "are") from None
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def _b64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class Progress:
    """How far a job is: steps over all images, and per image."""

    steps_done: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    images_done: int = 0
    num_images: int = 0
    steps_per_image: int = 0
    image_steps: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Progress:
        d = d or {}
        return cls(steps_done=int(d.get("steps_done", 0)),
                   total_steps=int(d.get("total_steps", 0)),
                   fraction=float(d.get("fraction", 0.0)),
                   images_done=int(d.get("images_done", 0)),
                   num_images=int(d.get("num_images", 0)),
                   steps_per_image=int(d.get("steps_per_image", 0)),
                   image_steps=tuple(int(s) for s in d.get("image_steps", ())))


@dataclass(frozen=True)
class Generation:
    """A job as `GET /v1/generations/{id}` reports it. `request` is the accepted request
    (the seed drawn for it included; input images named by digest)."""

    id: str
    status: str
    model: str
    progress: Progress = field(default_factory=Progress)
    images: tuple[str, ...] = ()
    request: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Generation:
        return cls(id=str(d["id"]), status=str(d["status"]), model=str(d.get("model", "")),
                   progress=Progress.from_json(d.get("progress")),
                   images=tuple(d.get("images") or ()), request=dict(d.get("request") or {}),
                   links=dict(d.get("links") or {}), created_at=_time(d.get("created_at")),
                   started_at=_time(d.get("started_at")),
                   finished_at=_time(d.get("finished_at")),
                   queue_position=d.get("queue_position"), error=d.get("error"), raw=d)

    @property
    def done(self) -> bool:
        """The job has ended (succeeded, failed or canceled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def num_images(self) -> int:
        return int(self.request.get("num_images", self.progress.num_images or 1))

    @property
    def seed(self) -> int | None:
        """The seed the job ran with: the same request and seed give the same pixels."""
        return self.request.get("seed")


@dataclass(frozen=True)
class Model:
    """A model live workers serve (`GET /v1/models`)."""

    name: str
    image_size: int
    in_channels: int
    num_timesteps: int
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    parameters: int = 0
    workers: int = 0
    queued: int = 0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Model:
        return cls(name=str(d["name"]), image_size=int(d.get("image_size", 0)),
                   in_channels=int(d.get("in_channels", 0)),
                   num_timesteps=int(d.get("num_timesteps", 0)),
                   num_classes=int(d.get("num_classes", 0)),
                   class_names=tuple(d.get("class_names") or ()),
                   parameters=int(d.get("parameters", 0)), workers=int(d.get("workers", 0)),
                   queued=int(d.get("queued", 0)))


class EventType(StrEnum):
    """The events of a job's stream (README, "The HTTP API")."""

    STARTED = "started"
    PROGRESS = "progress"
    SNAPSHOT = "snapshot"
    IMAGE = "image"
    DONE = "done"
    ERROR = "error"
    CANCELED = "canceled"
    REQUEUED = "requeued"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR, EventType.CANCELED})


def _event_type(name: str) -> EventType | str:
    try:
        return EventType(name)
    except ValueError:
        return name          # a newer server's event: passed on as its name


@dataclass(frozen=True)
class Event:
    """One event of a job's stream. `id` is its Redis Stream id (what a reconnect resumes
    after); only a terminal event the server synthesized for a job that ended without one
    has none. `type` is an EventType (a plain string for a type this client does not
    know)."""

    type: EventType | str
    data: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    @classmethod
    def parse(cls, name: str, data: dict[str, Any], event_id: str | None) -> Event:
        return cls(_event_type(name), data, event_id)

    @property
    def terminal(self) -> bool:
        """`done`, `error` or `canceled`: the stream ends after it."""
        return self.type in TERMINAL_EVENTS

    @property
    def png(self) -> bytes | None:
        """PNG bytes as sent: a final image sent inline (`inline_images=True`), or a
        snapshot frame whose `format` is png (a webp or jpeg frame is in `image`; a
        `Frame` converts it: `frames()`)."""
        if "png" in self.data:
            return _b64(self.data["png"])
        return self.image if self.format == "png" else None

    @property
    def image(self) -> bytes | None:
        """A snapshot's frame as sent, in its `format` (a final image sent inline: its
        PNG)."""
        text = self.data.get("image", self.data.get("png"))
        return _b64(text)

    @property
    def format(self) -> str | None:
        """The format of `image`: png, webp or jpeg (servers before frame formats sent PNG
        frames only); None when the event carries no image."""
        if "format" in self.data:
            return str(self.data["format"])
        return "png" if "image" in self.data or "png" in self.data else None

    @property
    def index(self) -> int | None:
        """The image a snapshot or image event is about."""
        i = self.data.get("index")
        return int(i) if i is not None else None

    @property
    def step(self) -> int | None:
        s = self.data.get("step")
        return int(s) if s is not None else None

    @property
    def message(self) -> str | None:
        """Why a job failed or was canceled."""
        return self.data.get("message")


@dataclass(frozen=True)
class Frame:
    """A snapshot of one image mid-denoising: x̂0 (or x_t) after `step` steps, as the
    server encoded it: `image` bytes in `format` (png, webp or jpeg), `size` pixels a side
    (a preview can be smaller than the final image; 0: not stated). `dropped`: frames of
    this image the worker skipped just before this one, having fallen behind."""

    index: int
    step: int
    kind: str
    image: bytes
    event_id: str | None = None
    format: str = "png"
    size: int = 0
    dropped: int = 0

    @property
    def png(self) -> bytes:
        """The frame as PNG bytes: `image` itself when it is a PNG, else converted (needs
        Pillow: the `images` extra)."""
        return to_png(self.image, self.format)

    def pil(self) -> Any:
        """The frame as a PIL image, whatever its format (needs Pillow)."""
        return to_pil(self.image)


@dataclass(frozen=True)
class Result:
    """What `generate` returns: the finished job and its images as PNG bytes, in order."""

    generation: Generation
    images: tuple[bytes, ...]

    def pil(self) -> list[Any]:
        return [to_pil(p) for p in self.images]

    def save(self, directory: str | Path) -> list[Path]:
        """Write `0000.png`, `0001.png`… into `directory` (made if missing), as
        `ddpm sample` names its files."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, png in enumerate(self.images):
            path = out / f"{i:04d}.png"
            path.write_bytes(png)
            paths.append(path)
        return paths
