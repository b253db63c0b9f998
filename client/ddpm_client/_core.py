"""What the sync and the async client share: every request built and every response read
here, once, so the two cannot drift apart; they only differ in how bytes move.

A request/response operation is a generator ("sans-IO"): it yields `Call`s, receives each
`httpx.Response`, and returns the result; `Client` drives it with `httpx.Client`,
`AsyncClient` with `httpx.AsyncClient`. Following an event stream across dropped
connections is the state machine `Follower` (SSE decoding, the id to resume after, when
to retry and when to give up), which both clients feed lines.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx

from .errors import ApiError, StreamError, WaitTimeout, api_error
from .types import Event, Frame, Generation, Model, Result

T = TypeVar("T")
Op = Generator["Call", httpx.Response, T]   # yields requests, is sent responses, returns T

INPUT_FIELDS = ("init_image", "mask", "interpolate_to")
Upload = Literal["multipart", "base64"]
ROOT = "/v1/generations"


@dataclass
class Call:
    """One HTTP request, as data."""

    method: str
    path: str
    params: dict[str, str] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Images kept in object storage answer 307 to a presigned URL; httpx follows only when
    # asked, and drops the Authorization header on the way to another origin (the API key
    # never reaches the store).
    follow_redirects: bool = False

    def kwargs(self) -> dict[str, Any]:
        """httpx's `request(method, url, **kwargs)` arguments."""
        kw: dict[str, Any] = {"params": self.params, "headers": self.headers or None}
        if self.follow_redirects:
            kw["follow_redirects"] = True
        if self.json is not None:
            kw["json"] = self.json
        if self.files is not None:
            kw["files"], kw["data"] = self.files, self.data
        return kw


def headers(api_key: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    h = {"User-Agent": "ddpm-client/0.1", **(extra or {})}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def job_path(job_id: str, *rest: str) -> str:
    """`/v1/generations/{id}/…` with the id escaped: an id never becomes another path."""
    return "/".join((ROOT, quote(str(job_id), safe=""), *rest))


def check(resp: httpx.Response) -> httpx.Response:
    """`resp`, or the ApiError subclass its status and error body say."""
    if resp.status_code < 400:
        return resp
    try:
        body = resp.json()
    except ValueError:
        body = None
    raise api_error(resp.status_code, body, resp.text, resp.headers.get("retry-after"))


# -- input images ------------------------------------------------------------------------


def image_bytes(value: Any, name: str) -> bytes:
    """An input image as its file's bytes: bytes, a path (str or os.PathLike), a binary
    file object, or a PIL image (saved as PNG: lossless, so an inpainting keeps exactly its
    pixels)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str | os.PathLike):
        return Path(value).read_bytes()
    if hasattr(value, "save") and hasattr(value, "mode"):       # a PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if hasattr(value, "read"):
        data = value.read()
        if isinstance(data, bytes):
            return data
    raise TypeError(f"{name} must be bytes, a path, a binary file or a PIL image, "
                    f"not {type(value).__name__}")


def submit_call(fields: dict[str, Any], upload: Upload = "multipart",
                idempotency_key: str | None = None) -> Call:
    """`POST /v1/generations` for the native request `fields` (None values left out, so the
    server's defaults apply). Images go as file parts of a multipart form (no base64
    inflation) or, with `upload="base64"`, inside the JSON body."""
    if upload not in ("multipart", "base64"):
        raise ValueError("upload must be 'multipart' or 'base64'")
    body = {k: v for k, v in fields.items() if v is not None}
    images = {k: image_bytes(body.pop(k), k) for k in INPUT_FIELDS if k in body}
    h = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    if images and upload == "multipart":
        files = {k: (f"{k}.png", data, "application/octet-stream") for k, data in images.items()}
        return Call("POST", ROOT, data={"request": json.dumps(body)}, files=files, headers=h)
    body.update({k: base64.b64encode(data).decode("ascii") for k, data in images.items()})
    return Call("POST", ROOT, json=body, headers=h)


# -- request/response operations ---------------------------------------------------------


def models_op() -> Op[list[Model]]:
    doc = check((yield Call("GET", "/v1/models"))).json()
    return [Model.from_json(m) for m in doc.get("models", [])]


def model_op(name: str) -> Op[Model]:
    resp = yield Call("GET", "/v1/models/" + quote(name, safe=""))
    return Model.from_json(check(resp).json())


def submit_op(fields: dict[str, Any], upload: Upload,
              idempotency_key: str | None) -> Op[Generation]:
    resp = yield submit_call(fields, upload, idempotency_key)
    return Generation.from_json(check(resp).json())


def get_op(job_id: str) -> Op[Generation]:
    return Generation.from_json(check((yield Call("GET", job_path(job_id)))).json())


def cancel_op(job_id: str) -> Op[Generation]:
    return Generation.from_json(check((yield Call("DELETE", job_path(job_id)))).json())


def bytes_op(path: str) -> Op[bytes]:
    """A stored image's bytes, wherever the API keeps it (redirects followed)."""
    return check((yield Call("GET", path, follow_redirects=True))).content


def image_op(job_id: str, index: int) -> Op[bytes]:
    return (yield from bytes_op(job_path(job_id, "images", str(int(index)))))


def images_op(job_id: str, generation: Generation | None = None) -> Op[list[bytes]]:
    """Every final image of the job, in order (its request says how many)."""
    if generation is None:
        generation = yield from get_op(job_id)
    out = []
    for i in range(generation.num_images):
        out.append((yield from image_op(job_id, i)))
    return out


def result_op(generation: Generation) -> Op[Result]:
    """The images of a finished job, or GenerationError if it ended without them."""
    from .errors import GenerationError

    if not generation.succeeded:
        raise GenerationError(generation)
    return Result(generation, tuple((yield from images_op(generation.id, generation))))


# -- event streams -----------------------------------------------------------------------


def _id_key(event_id: str | None) -> tuple[int, int] | None:
    """A Redis Stream id as a number pair, to compare ids (`5-10` comes after `5-9`)."""
    if not event_id:
        return None
    ms, _, seq = event_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


class SSEDecoder:
    """Server-Sent Events lines → events. An event is dispatched only at its blank line, so
    a connection cut inside one yields nothing of it (the resume fetches it whole)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop a half-read event (a new connection starts clean)."""
        self._name, self._data, self._id = "", [], None
        self._seen = False

    def feed(self, line: str) -> Event | None:
        if not line:
            if not self._seen:
                return None
            name, text, event_id = self._name or "message", "\n".join(self._data), self._id
            self.reset()
            try:
                data = json.loads(text) if text else {}
            except ValueError:
                data = {"raw": text}
            return Event.parse(name, data if isinstance(data, dict) else {"value": data},
                               event_id)
        if line.startswith(":"):             # a comment: the server's keep-alive ping
            return None
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            self._name, self._seen = value, True
        elif key == "data":
            self._data.append(value)
            self._seen = True
        elif key == "id" and "\0" not in value:
            self._id, self._seen = value, True
        return None


class Follower:
    """One job's event stream across connections.

    Remembers the id of the last whole event, to reconnect with `Last-Event-ID` after a drop
    (the server then sends exactly what came after it) and to drop anything at or before it
    (no duplicate even from a replaying server); counts consecutive failures and backs off
    exponentially, giving up with StreamError after `retries`; honours `Retry-After` on a
    429/503; raises WaitTimeout once `deadline` (time.monotonic) has passed."""

    def __init__(self, job_id: str, last_event_id: str | None = None, *,
                 inline_images: bool = False, retries: int = 5, backoff: float = 0.25,
                 max_backoff: float = 5.0, read_timeout: float = 60.0,
                 connect_timeout: float = 10.0, deadline: float | None = None) -> None:
        self.job_id = job_id
        self.last_id = last_event_id or None
        self._last_key = _id_key(self.last_id)
        self.inline_images = inline_images
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.read_timeout, self.connect_timeout = read_timeout, connect_timeout
        self.deadline = deadline
        self.failures = 0       # consecutive: an event received resets it
        self.connections = 0
        self.done = False
        self._sse = SSEDecoder()

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _check_deadline(self) -> None:
        left = self._remaining()
        if left is not None and left <= 0:
            raise WaitTimeout(f"generation {self.job_id} has not ended yet (timeout)")

    def connect(self) -> tuple[Call, httpx.Timeout]:
        """The request of the next connection (resuming after the last whole event)."""
        self._check_deadline()
        self._sse.reset()
        self.connections += 1
        h = {"Accept": "text/event-stream"}
        if self.last_id:
            h["Last-Event-ID"] = self.last_id
        params = {"images": "inline"} if self.inline_images else None
        read = self.read_timeout
        left = self._remaining()
        if left is not None:
            read = max(0.01, min(read, left))
        timeout = httpx.Timeout(self.connect_timeout, read=read)
        return Call("GET", job_path(self.job_id, "events"), params=params, headers=h), timeout

    def line(self, line: str) -> Event | None:
        """Feed one line; the event it completes, unless it repeats one already given."""
        ev = self._sse.feed(line)
        if ev is None:
            return None
        if ev.id is not None:
            key = _id_key(ev.id)
            if key is not None:
                if self._last_key is not None and key <= self._last_key:
                    return None
                self._last_key = key
            self.last_id = ev.id
        self.failures = 0
        if ev.terminal:
            self.done = True
        else:
            self._check_deadline()
        return ev

    def refused(self, resp: httpx.Response) -> float:
        """A connection answered with an error status: raise it, or (429, 503: the server's
        stream caps, Redis down for a moment) the seconds to wait before retrying."""
        try:
            check(resp)
        except ApiError as e:
            if e.status not in (429, 503):
                raise
            return self._retry(e, e.retry_after)
        return self._retry(None, None)      # a 2xx/3xx that is not a stream: try again

    def dropped(self, cause: Exception | None) -> float:
        """The connection broke, timed out, or ended before the terminal event: the seconds
        to wait before resuming (StreamError once the retries are spent)."""
        return self._retry(cause, None)

    def _retry(self, cause: Exception | None, hint: float | None) -> float:
        self._check_deadline()
        self.failures += 1
        if self.failures > self.retries:
            why = f": {cause}" if cause else " (the stream kept ending early)"
            raise StreamError(f"events of {self.job_id}: gave up after {self.retries} "
                              f"retries{why}") from cause
        delay = min(self.max_backoff, self.backoff * 2 ** (self.failures - 1))
        if hint is not None:
            delay = max(delay, min(hint, 30.0))
        left = self._remaining()
        return delay if left is None else max(0.0, min(delay, left))


def frame_of(ev: Event) -> Frame | None:
    """A snapshot event as a Frame (None for any other event)."""
    image = ev.image if ev.type == "snapshot" else None
    if image is None:
        return None
    return Frame(index=ev.index or 0, step=ev.step or 0, kind=str(ev.data.get("kind", "x0")),
                 image=image, event_id=ev.id, format=ev.format or "png",
                 size=_int(ev.data.get("size")), dropped=_int(ev.data.get("dropped")))


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


# After the terminal event the job's status is already final (workers store it first); a
# few short re-reads cover a server that records them the other way round.
SETTLE_TRIES, SETTLE_DELAY = 20, 0.05
