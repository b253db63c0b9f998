"""Submitting an OpenAI request's job and waiting for it the way these routes answer:
follow its event stream to the end (bounded by `DDPM_IMAGES_TIMEOUT_S`), as JSON or as
OpenAI's image events, and cancel the job when the request ends without it (the client
left, the wait timed out).

Snapshot frames come from the stream as the bytes the worker encoded (`JobStore.entries`):
a frame already in the asked format is base64-encoded once, straight into its event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from contract.events import Event, EventType
from contract.queueing import Job

from ..auth import Principal
from ..catalog import Served
from ..errors import ApiError
from ..jobs import JobStore
from ..metrics import ApiMetrics
from ..schemas import GenerationRequest
from ..settings import ApiSettings
from ..shards import Shards
from ..sse import EventStream
from ..stream_slots import StreamSlots
from ..streams import frame_format
from ..uploads import fit_inputs
from .errors import NO_RETRY, api_error_body
from .output import Output, sse, usage

log = logging.getLogger("ddpm.api")

T = TypeVar("T")
CLIENT_GONE = 499          # nginx's "client closed request": what the metrics record
_ENDINGS = (EventType.DONE, EventType.ERROR, EventType.CANCELED)


class Waiter:
    """One request waiting for its job: it holds a stream slot (the wait holds a Redis
    connection, as an open event stream does) and cancels the job unless it has ended by
    the time the request is done with it."""

    def __init__(self, jobs: JobStore, slots: StreamSlots, who: Principal, job: Job,
                 *, timeout: float) -> None:
        self.jobs, self.slots, self.who, self.job = jobs, slots, who, job
        self.timeout = timeout
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
                await run_in_threadpool(self.jobs.cancel, self.job)
                log.info("canceled %s: its /v1/images request ended without it", self.job.id)
            except ApiError:
                pass                            # it ended meanwhile
            except RedisError as e:
                log.warning("could not cancel %s: Redis unavailable (%s)", self.job.id, e)

    async def events(self) -> AsyncIterator[Event]:
        """The job's events until its terminal one; TimeoutError past `timeout`."""
        it = self.jobs.entries(self.job.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            while True:
                try:
                    _, ev = await asyncio.wait_for(anext(it), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                if ev.type in _ENDINGS:
                    self.ended = True
                yield ev
        finally:
            await it.aclose()

    async def image(self, index: int) -> bytes:
        png = await self.jobs.image(self.job.id, index)
        if png is None:
            raise ApiError(500, "internal_error", f"image {index} of job {self.job.id} is "
                           "missing (expired?)", headers=NO_RETRY)
        return bytes(png)

    async def all_images(self, n: int) -> list[bytes]:
        pngs = await self.jobs.all_images(self.job.id, n)
        if any(p is None for p in pngs):
            raise ApiError(500, "internal_error", f"images of job {self.job.id} are missing "
                           "(expired?)", headers=NO_RETRY)
        return [bytes(p) for p in pngs if p is not None]

    def failure(self, ev: Event) -> ApiError:
        """The error a terminal event other than `done` answers."""
        message = str(ev.data.get("message") or "")
        if ev.type == EventType.CANCELED:
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
                if ev.type == EventType.DONE:
                    return await self.all_images(n)
                if ev.type in (EventType.ERROR, EventType.CANCELED):
                    raise self.failure(ev)
        except TimeoutError:
            raise self.timed_out() from None
        raise self.failure(Event(EventType.ERROR, {"message": "no ending"}))

    async def stream(self, out: Output, n: int, partial_images: int, steps_per_image: int
                     ) -> AsyncIterator[bytes]:
        """The SSE body: per image, up to `partial_images` x̂0 previews, then the image; an
        `error` event if the job fails, is canceled or runs past the timeout."""
        partials = [0] * n
        completed: set[int] = set()
        done = False
        try:
            async for ev in self.events():
                if ev.type == EventType.SNAPSHOT and partial_images:
                    i = int(ev.data.get("index", -1))
                    if 0 <= i < n and partials[i] < partial_images and ev.image:
                        yield await partial_event(out, ev, partial_image_index=partials[i],
                                                  image_index=i)
                        partials[i] += 1
                elif ev.type == EventType.IMAGE:
                    i = int(ev.data.get("index", -1))
                    if 0 <= i < n and i not in completed:
                        completed.add(i)
                        yield out.event("completed", await self.image(i),
                                        usage=usage(steps_per_image), image_index=i)
                elif ev.type == EventType.DONE:
                    done = True
                    for i in range(n):          # an ending without image events
                        if i not in completed:
                            completed.add(i)
                            yield out.event("completed", await self.image(i),
                                            usage=usage(steps_per_image), image_index=i)
                elif ev.type in (EventType.ERROR, EventType.CANCELED):
                    yield error_event(self.failure(ev))
        except TimeoutError:
            yield error_event(self.timed_out())
        except ApiError as e:
            yield error_event(e)
        except RedisError as e:
            log.warning("images stream of %s ended: Redis unavailable (%s)", self.job.id, e)
            yield error_event(ApiError(503, "unavailable", "the job store is unreachable"))
        if not done and not self.ended:
            log.debug("images stream of %s ended before the job", self.job.id)


async def partial_event(out: Output, ev: Event, **extra: Any) -> bytes:
    """OpenAI's partial-image event of a snapshot (its frame as the worker encoded it, in
    its `format`), in the request's `output_format`: a frame in that format is base64-encoded
    once, as it is; one in another is re-encoded (in a thread: Pillow's work is not for the
    event loop). Its `size` is the frame's own, which a preview of a large model is smaller
    than."""
    assert ev.image is not None
    frame, fmt = ev.image, frame_format(ev)
    side = ev.data.get("size")
    if isinstance(side, int) and side > 0:
        extra["size"] = f"{side}x{side}"
    if not out.needs_encoding(fmt):
        return out.event("partial_image", frame, fmt, **extra)
    return await run_in_threadpool(lambda: out.event("partial_image", frame, fmt, **extra))


def error_event(e: ApiError) -> bytes:
    _, body = api_error_body(e)
    return sse("error", {"type": "error", **body})


class JobStream(EventStream):
    """The SSE response of a waiting request: whatever ends it (the job's end, the client
    leaving, the server stopping, even before its first byte) closes the Waiter."""

    def __init__(self, content: AsyncIterator[bytes], waiter: Waiter) -> None:
        super().__init__(content)
        self.waiter = waiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.waiter.close()


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


@dataclass(frozen=True)
class Front:
    """What answering a request takes: the rooms it submits and waits through."""

    shards: Shards           # the model's Redis takes the job (app/shards.py)
    slots: StreamSlots
    settings: ApiSettings
    metrics: ApiMetrics


async def answer(request: Request, front: Front, who: Principal, model: Served,
                 req: GenerationRequest, out: Output, *, stream: bool, partial_images: int
                 ) -> Response:
    """Fit the inputs, submit (one admission, as `POST /v1/generations`), then wait for
    the job: the images as JSON, or its events as SSE."""
    inputs = await fit_inputs(req.images(), model.info)
    shard = front.shards.by_model(model.info.name)
    slots = front.slots
    slots.acquire(who.client)       # 503/429 before a job is queued that nobody could await
    try:
        sub = await shard.admission.submit(req, who, None, inputs)
    except BaseException:
        slots.release(who.client)
        raise
    front.metrics.generations.labels(req.model).inc()
    waiter = Waiter(shard.jobs, slots, who, sub.job, timeout=front.settings.images_timeout_s)
    if stream:
        return JobStream(waiter.stream(out, req.num_images, partial_images,
                                       sub.spec.steps_per_image), waiter)
    try:
        pngs = await unless_gone(request, waiter.images(req.num_images))
    finally:
        await waiter.close()
    if pngs is None:
        return Response(status_code=CLIENT_GONE)
    urls = ([await shard.jobs.image_url(sub.job.id, i) for i in range(len(pngs))]
            if out.response_format == "url" else None)       # presigned, when in a store
    body = await run_in_threadpool(out.body, sub.job.id, pngs, sub.spec.total_steps, urls)
    return JSONResponse(body)
