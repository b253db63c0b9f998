"""A job's event stream, read live from its Redis Stream for SSE and WebSocket clients.

Stream entry ids are the event ids, so a client that reconnects with the last id it saw
gets exactly what it missed. A stream ends after its terminal event; if the job ended
without one reaching the stream (a worker died, the job expired), the job's RQ status
decides and a terminal event without an id closes the stream.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from rq.job import Job

from worker.contract import TERMINAL_EVENTS, Event, EventType, events_key, image_key

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
    """One event as clients receive it; `id` is None only for a synthesized ending."""

    event: str
    data: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def as_message(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.event, "data": self.data}


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode() if png else None


async def _client_data(redis: AsyncRedis, job_id: str, ev: Event) -> dict[str, Any]:
    """What a client gets for an entry: frames as base64 PNG, image URLs."""
    root = f"/v1/generations/{job_id}"
    data = dict(ev.data)
    if ev.type == EventType.SNAPSHOT:
        data["png"] = _b64(ev.png)
    elif ev.type == EventType.IMAGE:
        data["url"] = f"{root}/images/{data.get('index', 0)}"
        data["png"] = _b64(await redis.get(image_key(job_id, int(data.get("index", 0)))))
    elif ev.type == EventType.DONE:
        n = int(data.get("num_images", 0))
        data = {k: v for k, v in data.items() if k != "image_keys"}
        data["images"] = [f"{root}/images/{i}" for i in range(n)]
    return data


async def follow(redis: AsyncRedis, job_id: str, after: str, *,
                 poll_ms: int) -> AsyncIterator[StreamEvent]:
    """Events of `job_id` after id `after`, live, until the job's terminal event."""
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
                ev = Event.from_fields(fields)
            except (KeyError, ValueError):
                continue                       # not ours: skip rather than end the stream
            yield StreamEvent(str(ev.type), await _client_data(redis, job_id, ev), cursor)
            if ev.type in TERMINAL_EVENTS:
                return
        if entries:
            continue
        raw = await redis.hget(Job.key_for(job_id), "status")
        status = api_status(raw.decode()) if raw else None
        if status is None:
            yield StreamEvent(str(EventType.CANCELED), {"message": "the job no longer exists"})
            return
        if status in TERMINAL_STATUSES:
            if ending:
                yield StreamEvent(str(_ENDING[status]), {"status": status})
                return
            ending = True
