"""A job's event stream, read live from its Redis Stream for SSE, WebSocket and OpenAI
clients.

Stream entry ids are the event ids, so a client that reconnects with the last id it saw
gets exactly what it missed. A stream ends after its terminal event; if the job ended
without one reaching the stream (a worker died, the job expired), the job's RQ status
decides and a terminal event without an id closes the stream.

Entries are decoded by the one codec, `contract.events.Event.from_fields`. `reads` yields
them a read at a time (SSE sends each read as one chunk, app/sse.py), `entries` one at a
time, as decoded (a snapshot's frame as the bytes the worker encoded: the OpenAI routes take
it from there, with no base64 round-trip); `follow` turns them into what SSE and WebSocket
clients read. While a stream is idle the follower waits longer each time (up to
IDLE_BACKOFF × `DDPM_STREAM_POLL_MS`) before it looks at the job's status again: a job
waiting in a queue costs a few commands a minute, not two every poll.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from contract.events import TERMINAL_EVENTS, Event, EventType
from contract.keys import events_key, image_key
from contract.queueing import read_state

from .errors import ApiError
from .schemas import TERMINAL_STATUSES

# A job's final PNG by (job, index), wherever it is stored (app/jobs.py: Redis or the
# result store); None: not there.
ImageReader = Callable[[str, int], Awaitable[bytes | None]]
# An XREAD's reply, read already (the job's lookup and the stream's first read go in one
# round trip: app/jobs.py `aget_events`); None: nothing read yet.
Prefetched = Any

EVENT_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
MAX_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers
BATCH = 64               # entries per XREAD
END_GRACE_MS = 1000      # a worker writes the terminal event just after the status
IDLE_BACKOFF = 4         # an idle stream's XREAD BLOCK grows to this many poll intervals

_ENDING = {"succeeded": EventType.DONE, "failed": EventType.ERROR,
           "canceled": EventType.CANCELED}


def longest_block_ms(poll_ms: int) -> int:
    """The longest XREAD BLOCK a follower sends: the socket timeout must outlast it."""
    return max(poll_ms * IDLE_BACKOFF, END_GRACE_MS)


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


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def _with(data: str, **extra: str | None) -> str:
    """The JSON object `data` plus `extra` fields, spliced in without parsing `data` (a
    snapshot's base64 frame is the bulk of its event: it is encoded once and copied once)."""
    if any(f'"{k}"' in data for k in extra):          # not what workers write: the slow way
        return _dumps({**json.loads(data), **extra})
    fields = ",".join(f'"{k}":' + ("null" if v is None else f'"{v}"')
                      for k, v in extra.items())
    data = data.strip()
    return f"{data[:-1]},{fields}}}" if data[1:-1].strip() else f"{{{fields}}}"


def _b64(blob: bytes | None) -> str | None:
    return base64.b64encode(blob).decode("ascii") if blob else None


def frame_format(ev: Event) -> str:
    """A snapshot's frame format (one written before frame formats is a PNG)."""
    return str(ev.data.get("format") or "png")


async def client_data(redis: AsyncRedis | None, job_id: str, ev: Event,
                      inline_images: bool, image: ImageReader | None = None) -> str:
    """What a client gets for an event: a snapshot's frame as base64 `image` (in the
    `format` its data names: png, webp or jpeg), image URLs (and the final PNG as base64
    `png` when asked for)."""
    root = f"/v1/generations/{job_id}"
    data = _dumps(ev.data)
    if ev.type == EventType.SNAPSHOT:
        if "format" not in ev.data:          # written before frame formats: always PNG
            return _with(data, format="png", image=_b64(ev.image))
        return _with(data, image=_b64(ev.image))
    if ev.type == EventType.IMAGE:
        index = int(ev.data.get("index", 0))
        url = f"{root}/images/{index}"
        if not inline_images:
            return _with(data, url=url)
        if image is not None:
            return _with(data, url=url, png=_b64(await image(job_id, index)))
        assert redis is not None
        return _with(data, url=url, png=_b64(await redis.get(image_key(job_id, index))))
    if ev.type == EventType.DONE:
        doc = {k: v for k, v in ev.data.items() if k != "image_keys"}
        doc["images"] = [f"{root}/images/{i}" for i in range(int(ev.data.get("num_images", 0)))]
        return _dumps(doc)
    return data


async def reads(redis: AsyncRedis, job_id: str, after: str, *, poll_ms: int,
                first: Prefetched = None) -> AsyncIterator[list[tuple[str | None, Event]]]:
    """The job's events after id `after`, live, as (entry id, event), a list per read of
    the stream (an idle read's is empty: a caller may send a keepalive), until its terminal
    event; an ending read from the job's status comes with the id None. `first`: a
    non-blocking XREAD after `after` made already; if it found nothing, reading starts
    as if it had not been made (a blocking read, not a look at the status)."""
    key = events_key(job_id)
    cursor = after
    ending = False            # the job's status is terminal; waiting for its last events
    block = poll_ms
    while True:
        if first:
            resp, first = first, None
        else:
            resp = await redis.xread({key: cursor}, count=BATCH,
                                     block=END_GRACE_MS if ending else block)
        found = resp[0][1] if resp else []
        batch: list[tuple[str | None, Event]] = []
        for entry_id, fields in found:
            cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                ev = Event.from_fields(fields)
            except (KeyError, ValueError, TypeError, AttributeError):
                continue                       # not ours: skip rather than end the stream
            if not isinstance(ev.data, dict):
                continue
            batch.append((cursor, ev))
            if ev.type in TERMINAL_EVENTS:
                yield batch
                return
        if found:
            yield batch
            block = poll_ms
            continue
        status = await read_state(redis, job_id)
        if status is None:
            yield [(None, Event(EventType.CANCELED, {"message": "the job no longer exists"}))]
            return
        if status in TERMINAL_STATUSES:
            if ending:
                yield [(None, Event(_ENDING[status], {"status": status}))]
                return
            ending = True
        yield []
        block = min(block * 2, poll_ms * IDLE_BACKOFF)


async def entries(redis: AsyncRedis, job_id: str, after: str, *, poll_ms: int,
                  first: Prefetched = None) -> AsyncIterator[tuple[str | None, Event]]:
    """`reads`, one event at a time."""
    async for batch in reads(redis, job_id, after, poll_ms=poll_ms, first=first):
        for item in batch:
            yield item


async def follow_reads(redis: AsyncRedis, job_id: str, after: str, *, poll_ms: int,
                       inline_images: bool = False, image: ImageReader | None = None,
                       first: Prefetched = None) -> AsyncIterator[list[StreamEvent]]:
    """`reads` as SSE and WebSocket clients read them, a list per read (empty: an idle
    read); with `inline_images`, `image` events carry the final PNG (base64, read by
    `image`: else from Redis) as well as its URL."""
    async for batch in reads(redis, job_id, after, poll_ms=poll_ms, first=first):
        out = []
        for entry_id, ev in batch:
            try:
                data = await client_data(redis, job_id, ev, inline_images, image)
            except (KeyError, ValueError, TypeError, AttributeError):
                continue
            out.append(StreamEvent(str(ev.type), data, entry_id))
        yield out


async def follow(redis: AsyncRedis, job_id: str, after: str, *, poll_ms: int,
                 inline_images: bool = False, image: ImageReader | None = None,
                 first: Prefetched = None) -> AsyncIterator[StreamEvent]:
    """`follow_reads`, one event at a time."""
    async for batch in follow_reads(redis, job_id, after, poll_ms=poll_ms,
                                    inline_images=inline_images, image=image, first=first):
        for ev in batch:
            yield ev
