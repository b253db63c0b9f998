"""A job's event stream, read live from its Redis Stream for SSE and WebSocket clients.

Stream entry ids are the event ids, so a client that reconnects with the last id it saw
gets exactly what it missed. A stream ends after its terminal event; if the job ended
without one reaching the stream (a worker died, the job expired), the job's RQ status
decides and a terminal event without an id closes the stream.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from contract.events import TERMINAL_EVENTS, EventType
from contract.keys import events_key, image_key

from .errors import ApiError
from .jobs import api_status
from .schemas import TERMINAL_STATUSES

EVENT_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
MAX_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers
BATCH = 64               # entries per XREAD
END_GRACE_MS = 1000      # a worker writes the terminal event just after the status

_ENDING = {"succeeded": EventType.DONE, "failed": EventType.ERROR,
           "canceled": EventType.CANCELED}


def check_event_id(value: str | None, field_name: str) -> str:
    """The id to read after; `0` (everything) when none was given."""
    if value is None or value == "":
        return "0-0"
    if not EVENT_ID.match(value) or any(int(p) > MAX_ID_PART for p in value.split("-")):
        raise ApiError(422, "invalid_request", f"{field_name} must be an event id such as "
                       "1700000000000-0", field=field_name)
    return value


@dataclass(frozen=True)
class StreamEvent:
    """One event as clients receive it: `data` is its JSON text, relayed as the worker wrote
    it plus what the API adds; `id` is None only for a synthesized ending."""

    event: str
    data: str = "{}"
    id: str | None = None

    def as_message(self) -> str:
        """The WebSocket message `{"id", "event", "data"}`, built around `data` as is."""
        return f'{{"id":{json.dumps(self.id)},"event":"{self.event}","data":{self.data}}}'


def _with(data: str, **extra: str | None) -> str:
    """The JSON object `data` plus `extra` fields, spliced in without parsing `data` (a
    snapshot's base64 frame is the bulk of its event: it is encoded once and copied once)."""
    if any(f'"{k}"' in data for k in extra):          # not what workers write: the slow way
        return json.dumps({**json.loads(data), **extra}, separators=(",", ":"))
    fields = ",".join(f'"{k}":' + ("null" if v is None else f'"{v}"')
                      for k, v in extra.items())
    data = data.strip()
    return f"{data[:-1]},{fields}}}" if data[1:-1].strip() else f"{{{fields}}}"


def _b64(blob: bytes | None) -> str | None:
    return base64.b64encode(blob).decode("ascii") if blob else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _client_data(redis: AsyncRedis, job_id: str, kind: EventType, data: str,
                       image: bytes | None, inline_images: bool) -> str:
    """What a client gets for an entry: a snapshot's frame as base64 `image` (in the
    `format` its data names: png, webp or jpeg), image URLs (and the final PNG as base64
    `png` when asked for)."""
    root = f"/v1/generations/{job_id}"
    if kind == EventType.SNAPSHOT:
        if '"format"' not in data:          # written before frame formats: always PNG
            return _with(data, format="png", image=_b64(image))
        return _with(data, image=_b64(image))
    if kind == EventType.IMAGE:
        index = int(json.loads(data).get("index", 0))
        url = f"{root}/images/{index}"
        if not inline_images:
            return _with(data, url=url)
        return _with(data, url=url, png=_b64(await redis.get(image_key(job_id, index))))
    if kind == EventType.DONE:
        doc = json.loads(data)
        n = int(doc.get("num_images", 0))
        doc = {k: v for k, v in doc.items() if k != "image_keys"}
        doc["images"] = [f"{root}/images/{i}" for i in range(n)]
        return json.dumps(doc, separators=(",", ":"))
    return data


def _entry(fields: dict[bytes | str, bytes | str]) -> tuple[EventType, str, bytes | None]:
    """An entry's type, data (JSON object text, not parsed) and encoded frame (field
    `image`; `png` as written before frame formats); ValueError or KeyError if it is not an
    event (`contract.Event.to_fields` is the format)."""
    f = {_text(k): v for k, v in fields.items()}
    kind = EventType(_text(f["type"]))
    data = _text(f.get("data", "{}"))
    if not (data.startswith("{") and data.endswith("}")):
        raise ValueError("event data is not a JSON object")
    image = f.get("image", f.get("png"))
    return kind, data, image.encode() if isinstance(image, str) else image


async def follow(redis: AsyncRedis, job_id: str, after: str, *, poll_ms: int,
                 inline_images: bool = False) -> AsyncIterator[StreamEvent]:
    """Events of `job_id` after id `after`, live, until the job's terminal event; with
    `inline_images`, `image` events carry the final PNG (base64) as well as its URL."""
    key = events_key(job_id)
    cursor = after
    ending = False            # the job's status is terminal; waiting for its last events
    while True:
        resp = await redis.xread({key: cursor}, count=BATCH,
                                 block=END_GRACE_MS if ending else poll_ms)
        entries = resp[0][1] if resp else []
        for entry_id, fields in entries:
            cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                kind, data, image = _entry(fields)
                data = await _client_data(redis, job_id, kind, data, image, inline_images)
            except (KeyError, ValueError, TypeError, AttributeError):
                continue                       # not ours: skip rather than end the stream
            yield StreamEvent(str(kind), data, cursor)
            if kind in TERMINAL_EVENTS:
                return
        if entries:
            continue
        raw = await redis.hget(Job.key_for(job_id), "status")
        status = api_status(raw.decode()) if raw else None
        if status is None:
            yield StreamEvent(str(EventType.CANCELED), '{"message":"the job no longer exists"}')
            return
        if status in TERMINAL_STATUSES:
            if ending:
                yield StreamEvent(str(_ENDING[status]), f'{{"status":"{status}"}}')
                return
            ending = True
