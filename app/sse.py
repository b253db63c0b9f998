"""A job's Server-Sent Events response, framed here rather than by FastAPI's generator
routes (`fastapi.sse`).

FastAPI runs each SSE response as a task group of two tasks (the generator's producer and
a keepalive inserter), with two memory streams and a timeout scope per event, and sends
every event as its own body message (one socket write each). A job's stream is read a
batch at a time (one XREAD: a 1-image job's last image, progress and `done` arrive
together), so here each read becomes one body message, framed by FastAPI's own
`format_sse_event`, and an idle stream gets a keepalive comment from the follower's own
idle reads, not a timer (BENCHMARKS.md §17).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event

from .streams import StreamEvent

KEEPALIVE = b": ping\n\n"     # a comment: clients ignore it, proxies see bytes flow

# The route's 200 in the OpenAPI document, as FastAPI's SSE routes state theirs (made a
# valid 3.1 document by app/openapi.py).
EVENT_STREAM_CONTENT = {"text/event-stream": {"itemSchema": {
    "type": "object", "properties": {
        "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0}}}}}


class EventStream(StreamingResponse):
    """`text/event-stream`, neither cached nor buffered by a proxy (nginx)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})


def frame(ev: StreamEvent) -> bytes:
    """One event as SSE: `event:`, its JSON `data:` line, and `id:` (none for an ending
    made from the job's status)."""
    return format_sse_event(data_str=ev.data, event=ev.event, id=ev.id)


async def sse(reads: AsyncIterator[list[StreamEvent]], keepalive_s: float
              ) -> AsyncIterator[bytes]:
    """The events of each read as one chunk; after `keepalive_s` without a byte sent, a
    keepalive comment at the next idle read."""
    last = time.monotonic()
    async for batch in reads:
        now = time.monotonic()
        if batch:
            yield b"".join(map(frame, batch))
        elif now - last >= keepalive_s:
            yield KEEPALIVE
        else:
            continue
        last = now
