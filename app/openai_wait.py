"""Waiting for a job the way the OpenAI-compatible routes answer: follow its event stream
to the end (bounded by `DDPM_IMAGES_TIMEOUT_S`), as JSON or as OpenAI's image events, and
cancel the job when the request ends without it (the client left, the wait timed out).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from rq.job import Job
from starlette.types import Receive, Scope, Send

from contract.events import EventType
from contract.keys import image_key

from .auth import Principal
from .errors import ApiError
from .jobs import JobStore
from .openai_compat import NO_RETRY, Output, from_api_error, sse, usage
from .stream_slots import StreamSlots
from .streams import StreamEvent, follow

log = logging.getLogger("ddpm.api")


class Waiter:
    """One request waiting for its job: it holds a stream slot (the wait holds a Redis
    connection, as an open event stream does) and cancels the job unless it has ended by
    the time the request is done with it."""

    def __init__(self, store: JobStore, slots: StreamSlots, who: Principal, job: Job,
                 *, poll_ms: int, timeout: float) -> None:
        self.store, self.slots, self.who, self.job = store, slots, who, job
        self.poll_ms, self.timeout = poll_ms, timeout
        self.ended = False
        self._closed = False

    async def close(self) -> None:
        """Release the slot; cancel the job if it has not ended (shielded: this runs when
        the request is being cancelled, its client gone)."""
        if self._closed:
            return
        self._closed = True
        self.slots.release(self.who.client)
        if self.ended:
            return
        with anyio.CancelScope(shield=True):
            try:
                await run_in_threadpool(self.store.cancel, self.job)
                log.info("canceled %s: its /v1/images request ended without it", self.job.id)
            except ApiError:
                pass                            # it ended meanwhile
            except RedisError as e:
                log.warning("could not cancel %s: Redis unavailable (%s)", self.job.id, e)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The job's events until its terminal one; TimeoutError past `timeout`."""
        assert self.store.aredis is not None
        it = follow(self.store.aredis, self.job.id, "0-0", poll_ms=self.poll_ms)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(anext(it), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                if ev.event in (EventType.DONE, EventType.ERROR, EventType.CANCELED):
                    self.ended = True
                yield ev
        finally:
            await it.aclose()

    async def image(self, index: int) -> bytes:
        assert self.store.aredis is not None
        png = await self.store.aredis.get(image_key(self.job.id, index))
        if png is None:
            raise ApiError(500, "internal_error", f"image {index} of job {self.job.id} is "
                           "missing (expired?)", headers=NO_RETRY)
        return bytes(png)

    async def all_images(self, n: int) -> list[bytes]:
        assert self.store.aredis is not None
        pngs = await self.store.aredis.mget([image_key(self.job.id, i) for i in range(n)])
        if any(p is None for p in pngs):
            raise ApiError(500, "internal_error", f"images of job {self.job.id} are missing "
                           "(expired?)", headers=NO_RETRY)
        return [bytes(p) for p in pngs]

    def failure(self, ev: StreamEvent) -> ApiError:
        """The error a terminal event other than `done` answers."""
        try:
            message = str(json.loads(ev.data).get("message") or "")
        except (ValueError, AttributeError):
            message = ""
        if ev.event == EventType.CANCELED:
            return ApiError(409, "canceled", f"job {self.job.id} was canceled"
                            + (f": {message}" if message else ""), headers=NO_RETRY)
        return ApiError(500, "generation_failed", f"job {self.job.id} failed"
                        + (f": {message}" if message else ""), headers=NO_RETRY)

    def timed_out(self) -> ApiError:
        return ApiError(504, "timeout", f"job {self.job.id} did not end within "
                        f"{self.timeout:g} s (DDPM_IMAGES_TIMEOUT_S); it is canceled",
                        headers=NO_RETRY)

    async def images(self, n: int) -> list[bytes]:
        """The job's final PNGs, once it has succeeded."""
        try:
            async for ev in self.events():
                if ev.event == EventType.DONE:
                    return await self.all_images(n)
                if ev.event in (EventType.ERROR, EventType.CANCELED):
                    raise self.failure(ev)
        except TimeoutError:
            raise self.timed_out() from None
        raise self.failure(StreamEvent(str(EventType.ERROR), '{"message":"no ending"}'))

    async def stream(self, out: Output, n: int, partial_images: int, steps_per_image: int
                     ) -> AsyncIterator[bytes]:
        """The SSE body: per image, up to `partial_images` x̂0 previews, then the image; an
        `error` event if the job fails, is canceled or runs past the timeout."""
        partials = [0] * n
        completed: set[int] = set()
        done = False
        try:
            async for ev in self.events():
                if ev.event == EventType.SNAPSHOT and partial_images:
                    data = json.loads(ev.data)
                    i = int(data.get("index", -1))
                    if 0 <= i < n and partials[i] < partial_images and data.get("image"):
                        yield await partial_event(out, data, partial_image_index=partials[i],
                                                  image_index=i)
                        partials[i] += 1
                elif ev.event == EventType.IMAGE:
                    i = int(json.loads(ev.data).get("index", -1))
                    if 0 <= i < n and i not in completed:
                        completed.add(i)
                        yield out.event("completed", await self.image(i),
                                        usage=usage(steps_per_image), image_index=i)
                elif ev.event == EventType.DONE:
                    done = True
                    for i in range(n):          # an ending without image events
                        if i not in completed:
                            completed.add(i)
                            yield out.event("completed", await self.image(i),
                                            usage=usage(steps_per_image), image_index=i)
                elif ev.event in (EventType.ERROR, EventType.CANCELED):
                    yield _error_event(self.failure(ev))
        except TimeoutError:
            yield _error_event(self.timed_out())
        except ApiError as e:
            yield _error_event(e)
        except RedisError as e:
            log.warning("images stream of %s ended: Redis unavailable (%s)", self.job.id, e)
            yield _error_event(ApiError(503, "unavailable", "the job store is unreachable"))
        if not done and not self.ended:
            log.debug("images stream of %s ended before the job", self.job.id)


async def partial_event(out: Output, data: dict[str, Any], **extra: Any) -> bytes:
    """OpenAI's partial-image event of a snapshot (`data` as `follow` relays it: the frame
    as base64 `image` in its `format`), in the request's `output_format`: a frame in
    another format is re-encoded (in a thread: Pillow's work is not for the event loop).
    Its `size` is the frame's own, which a preview of a large model is smaller than."""
    frame = base64.b64decode(data["image"])
    fmt = str(data.get("format") or "png")
    side = data.get("size")
    if isinstance(side, int) and side > 0:
        extra["size"] = f"{side}x{side}"
    if fmt == out.format:
        return out.event("partial_image", frame, fmt, **extra)
    return await run_in_threadpool(lambda: out.event("partial_image", frame, fmt, **extra))


def _error_event(e: ApiError) -> bytes:
    body = json.loads(bytes(from_api_error(e).body))
    return sse("error", {"type": "error", **body})


class JobStream(StreamingResponse):
    """The SSE response of a waiting request: whatever ends it (the job's end, the client
    leaving, the server stopping, even before its first byte) closes the Waiter."""

    def __init__(self, content: AsyncIterator[bytes], waiter: Waiter) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.waiter = waiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.waiter.close()


T = TypeVar("T")
CLIENT_GONE = 499          # nginx's "client closed request": what the metrics record


async def unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None as soon as the client disconnects (`work` is cancelled).
    The body has been read: the next ASGI message is the disconnect."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()
