"""`/v1/generations`: submit, poll, stream, download, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Header, Query, Request, Response, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from contract.events import EventType
from contract.limits import InputField
from contract.queueing import Job
from contract.spec import SpecError

from .. import media
from ..catalog import model_required
from ..deps import Caller, CatalogDep, Jobs, Metrics, Settings, ShardsDep, StreamSlot, ViewsDep
from ..errors import ERROR_RESPONSES, JSON_ERROR_RESPONSES, ApiError, not_found
from ..jobs import JobStore
from ..schemas import SOLE_MODEL, Generation, GenerationRequest, NewGeneration
from ..settings import ApiSettings
from ..sse import EVENT_STREAM_CONTENT, EventStream, sse
from ..stream_slots import StreamSlots
from ..streams import MAX_ID_PART, Prefetched, StreamEvent, check_event_id
from ..uploads import MULTIPART_SCHEMA, UploadRoute, fit_inputs

# UploadRoute: the POST's body may also be multipart/form-data with image files.
router = APIRouter(prefix="/v1/generations", tags=["generations"], route_class=UploadRoute)
log = logging.getLogger("ddpm.api")

PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}
STORED = {307: {"description": "kept in object storage (DDPM_RESULTS_URL): a presigned URL "
                               "of the PNG in `Location`"}}
GIF = {200: {"content": {"image/gif": {}}, "description": "animated GIF"}}
NOT_READY = {409: ERROR_RESPONSES[404] | {"description": "not produced yet"}}
UNSUPPORTED = {415: ERROR_RESPONSES[404] | {
    "description": "the body is neither application/json nor multipart/form-data "
    "(app/body_limit.py); `Accept-Post` lists both"}}


# What JobStore accepts as an Idempotency-Key: printable characters (str.isprintable over
# the latin-1 text a header arrives as), with none of the spaces a server strips at its ends.
_KEY_CHAR = "!-~\u00a1-\u00ac\u00ae-\u00ff"
IDEMPOTENCY_KEY_PATTERN = f"^[{_KEY_CHAR}](?:[ {_KEY_CHAR}]*[{_KEY_CHAR}])?$"


def _check_webhook(url: str | None, settings: ApiSettings) -> None:
    """Only hosts on the allow-list: the service must not be a way into internal networks.
    (The request model has checked the URL's form; a URL that still does not parse is a
    422 too, never a 500.)"""
    if url is None:
        return
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError as e:
        raise ApiError(422, "invalid_request", f"webhook is not a valid URL: {e}",
                       field="webhook") from None
    allowed = any(host == h or (h.startswith(".") and (host.endswith(h) or host == h[1:]))
                  for h in settings.webhook_allow_hosts)
    if not host or not allowed:
        raise ApiError(422, "invalid_request", f"webhook host {host!r} is not allowed "
                       "(DDPM_WEBHOOK_ALLOW_HOSTS)", field="webhook")


async def _sole_model(catalog: CatalogDep) -> None:
    """Before the body is validated: the model a body without one gets (SOLE_MODEL), from
    the served models as last read (read again in a thread once they are stale)."""
    served = await catalog.recent()
    if len(served) == 1:
        SOLE_MODEL.set((next(iter(served)), ""))
    else:
        SOLE_MODEL.set((None, model_required(served)))


@router.post("", status_code=202, response_model=Generation,
             responses=ERROR_RESPONSES | UNSUPPORTED,
             summary="Submit a generation", dependencies=[Depends(_sole_model)],
             openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": MULTIPART_SCHEMA}}}})
async def create_generation(
    body: NewGeneration, who: Caller, catalog: CatalogDep, shards: ShardsDep,
    settings: Settings, metrics: Metrics,
    idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=255, json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
        description="same key and body: the same job comes back")] = None,
) -> Response:
    """Validate against the models live workers serve, then enqueue; `202` with the job.

    One Redis round-trip in the common case, made from the event loop: the idempotency
    record, the rate limit, the queue depth and RQ's enqueue are one Lua script; the served
    models are read at most every `DDPM_MODELS_CACHE_S` seconds.

    Input images (`init_image`, `mask`, `interpolate_to`) come as base64 in JSON, or as
    file parts of a `multipart/form-data` body whose `request` part holds the rest:
    `curl -F init_image=@digit.png -F 'request={"strength": 0.6}'`."""
    req: GenerationRequest = body       # its model filled in if left out (_sole_model)
    model = await catalog.lookup(req.model)
    try:
        req.check_model(model.info)
        req.check_stream_budget(model.info, settings.stream_max_bytes)
    except SpecError as e:
        raise ApiError(422, "invalid_request", str(e), field=e.field) from None
    _check_webhook(req.webhook, settings)
    inputs = await fit_inputs(req.images(), model.info)
    shard = shards.by_model(model.info.name)     # its Redis (app/shards.py)
    views = shard.views
    sub = await shard.admission.submit(req, who, idempotency_key, inputs)
    if sub.replayed:                 # an earlier job: its status and position are read
        view = await run_in_threadpool(views.view, sub.job)
    else:
        view = views.view(sub.job, spec=sub.spec, ahead=sub.ahead)
    headers = {"Location": view.links.self_}
    if sub.replayed:
        headers["Idempotent-Replayed"] = "true"
    else:
        metrics.generations.labels(req.model).inc()
    return _generation(view, 202, headers)


def _generation(view: Generation, status: int = 200,
                headers: dict[str, str] | None = None) -> Response:
    """`view` as the JSON its response model documents, serialized once: FastAPI would
    dump the model, validate the dump against the model again, then serialize it."""
    return Response(view.model_dump_json(by_alias=True), status, headers,
                    media_type="application/json")


async def _job(job_id: str, who: Caller, jobs: Jobs) -> Job:
    return await jobs.aget(job_id, who)


JobDep = Annotated[Job, Depends(_job)]


@router.get("/{job_id}", response_model=Generation, responses=ERROR_RESPONSES,
            summary="Status, progress, timings and image links")
def get_generation(job: JobDep, views: ViewsDep) -> Response:
    return _generation(views.view(job))


@router.delete("/{job_id}", response_model=Generation,
               responses=ERROR_RESPONSES | {409: ERROR_RESPONSES[404] | {
                   "description": "the generation has already ended"}},
               summary="Cancel a queued or running generation")
def cancel_generation(job: JobDep, jobs: Jobs, views: ViewsDep) -> Generation:
    jobs.cancel(job)
    return views.view(jobs.reload(job))


@router.get("/{job_id}/images/{index}", response_class=Response,
            responses=PNG | STORED | ERROR_RESPONSES, summary="One final image (PNG)")
async def get_image(job_id: str, index: int, who: Caller, jobs: Jobs) -> Response:
    job, stored = await jobs.aget_image(job_id, who, index)   # one round trip for both
    spec = jobs.spec_of(job)
    if not 0 <= index < spec.num_images:
        raise not_found(f"image {index}")
    return _stored_png(await jobs.image_ref(stored), f"image {index} (not produced yet)")


def _stored_png(png: bytes | str | None, missing: str) -> Response:
    """A PNG the job wrote once and never changes (cacheable), or 404 `missing`; kept in
    object storage (DDPM_RESULTS_URL), a 307 to a presigned URL of it (not cached: the URL
    expires; clients follow it without the API key, a cross-origin redirect)."""
    if png is None:
        raise not_found(missing)
    if isinstance(png, str):
        return RedirectResponse(png, status_code=307, headers={"Cache-Control": "no-store"})
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400, immutable"})


@router.get("/{job_id}/inputs/{name}", response_class=Response,
            responses=PNG | STORED | ERROR_RESPONSES,
            summary="An input image as the model sees it (fitted to its size)")
async def get_input(job: JobDep, name: InputField, jobs: Jobs) -> Response:
    if getattr(jobs.spec_of(job), name) is None:
        raise not_found(f"input {name!r}")
    return _stored_png(await jobs.input_ref(job.id, name), f"input {name!r} (expired)")


@router.get("/{job_id}/grid.png", response_class=Response,
            responses=PNG | NOT_READY | ERROR_RESPONSES, summary="All final images in a grid")
def get_grid(job: JobDep, jobs: Jobs, views: ViewsDep) -> Response:
    spec = jobs.spec_of(job)
    pngs = jobs.images(job, range(spec.num_images))
    if any(p is None for p in pngs):
        view = views.view(job)
        if view.status in ("queued", "running"):
            raise ApiError(409, "not_ready", f"the generation is {view.status}; the grid "
                           "exists once every image is done", headers={"Retry-After": "1"})
        raise not_found("grid (the generation has no complete set of images)")
    return Response(media.grid_png([p for p in pngs if p is not None]), media_type="image/png")


@router.get("/{job_id}/animation.gif", response_class=Response,
            responses=GIF | ERROR_RESPONSES,
            summary="The denoising as an animated GIF (from the snapshots)")
def get_animation(job: JobDep, jobs: Jobs) -> Response:
    spec = jobs.spec_of(job)
    snapshots = [(int(ev.data.get("step", 0)), int(ev.data.get("index", -1)), ev.image)
                 for ev in jobs.events(job) if ev.type == EventType.SNAPSHOT and ev.image]
    finals = jobs.images(job, range(spec.num_images))
    try:
        gif = media.animation_gif(spec.num_images, snapshots, finals)
    except ValueError:
        raise not_found("animation (no frames yet; submit with snapshot_every > 0 to see "
                        "the denoising)") from None
    return Response(gif, media_type="image/gif")


# -- streams ---------------------------------------------------------------------------


def _at_most(n: int) -> str:
    """A regular expression for the decimal strings of at most len(str(n)) digits (leading
    zeros allowed) whose value is at most `n`."""
    d = str(n)
    alts = [f"[0-9]{{1,{len(d) - 1}}}"] if len(d) > 1 else []
    for i, c in enumerate(d):
        if c != "0":
            rest = len(d) - i - 1
            alts.append(d[:i] + ("0" if c == "1" else f"[0-{int(c) - 1}]")
                        + (f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(d)
    return "(?:" + "|".join(alts) + ")"


# What check_event_id accepts, as the schema states it: empty, or a Redis stream id (one or
# two parts, each an unsigned 64-bit number).
EVENT_ID_PATTERN = f"^(?:{_at_most(MAX_ID_PART)}(?:-{_at_most(MAX_ID_PART)})?)?$"


async def _last_event_id(last_event_id: Annotated[str, Header(   # a string or absent:
        max_length=64, json_schema_extra={"pattern": EVENT_ID_PATTERN},   # never `null`
        description="resume after this event id: `MS` or `MS-SEQ`, each part at most "
                    "2^64-1 (a Redis stream id)")] = "") -> str:
    return check_event_id(last_event_id, "Last-Event-ID")


async def _job_and_events(job_id: str, who: Caller, jobs: Jobs, request: Request
                          ) -> tuple[Job, Prefetched]:
    """The job (404 first, as for every route of a job) and, in the same round trip, its
    stream's entries after Last-Event-ID as they are now (the follower's first read). The
    header is read as FastAPI reads it for `_last_event_id` (`Headers.get`), which answers
    a malformed one with 422 before the stream starts; here such a one reads nothing."""
    try:
        after = check_event_id(request.headers.get("last-event-id", ""), "Last-Event-ID")
    except ApiError:
        return await jobs.aget(job_id, who), None
    return await jobs.aget_events(job_id, who, after)


ImageMode = Literal["url", "inline"]
_IMAGES_QUERY = Query(description="`image` events carry the final image's `url`; `inline` "
                      "adds the PNG itself as base64 (`png`), which the image URL also serves")


@router.get("/{job_id}/events", response_class=EventStream, status_code=200,
            summary="Server-Sent Events of the generation",
            responses={200: {"content": EVENT_STREAM_CONTENT}, **JSON_ERROR_RESPONSES})
async def stream_events(job_events: Annotated[tuple[Job, Prefetched], Depends(_job_and_events)],
                        jobs: Jobs, after: Annotated[str, Depends(_last_event_id)],
                        _slot: StreamSlot,
                        images: Annotated[ImageMode, _IMAGES_QUERY] = "url",
                        ) -> EventStream:
    """`started`, `progress`, `snapshot` (the frame as base64 `image` in its `format`,
    png/webp/jpeg, `size` pixels a side), `image` (its URL; the PNG as base64 too with
    `?images=inline`), then one of `done`, `error` or `canceled`, which
    closes the stream. Ids are the job's Redis Stream ids: a reconnect with `Last-Event-ID`
    resumes exactly after the last one seen. Past the open stream limits: `503` (this
    server) or `429` (this caller), with `Retry-After`. An idle stream carries a comment
    (`: ping`) every `DDPM_SSE_KEEPALIVE_S` or so."""
    job, first = job_events
    reads = jobs.follow_reads(job.id, after, inline_images=images == "inline", first=first)
    return EventStream(_until_redis_fails(sse(reads, jobs.settings.sse_keepalive_s), job.id))


async def _until_redis_fails(body: AsyncIterator[bytes], job_id: str) -> AsyncIterator[bytes]:
    """`body`, ended quietly if Redis fails: the headers are sent, so no 503 now. The
    stream ends without a terminal event, as a dropped connection does; the client resumes
    with Last-Event-ID (503 until Redis is back), rather than the server failing the
    response mid-stream."""
    try:
        async for chunk in body:
            yield chunk
    except RedisError as e:
        log.warning("event stream of %s ended: Redis unavailable (%s)", job_id, e)


@router.websocket("/{job_id}/ws")
async def stream_ws(websocket: WebSocket, job_id: str, last_event_id: str | None = None,
                    images: str | None = None) -> None:
    """The same events as JSON messages `{"id", "event", "data"}`; `?last_event_id=` resumes,
    `?images=inline` puts the final PNGs in `image` events as for SSE.
    Closes with 1000 after the terminal event; 4401/4404/4422 for auth, unknown job, bad id
    or `images`; 4503/4429 past the open stream limits of the server/the caller, 4503 also
    while Redis is unreachable (1013 if it goes away mid-stream).
    """
    state = websocket.app.state
    slots: StreamSlots = state.streams
    await websocket.accept()
    try:
        who = state.auth.caller(websocket)
        jobs: JobStore = state.shards.by_job(job_id).jobs      # 404 for an unknown tag
        try:
            after = check_event_id(last_event_id, "last_event_id")
        except ApiError:
            await jobs.aget(job_id, who)      # an unknown job: 404 before the id's 422
            raise
        job, first = await jobs.aget_events(job_id, who, after)   # one round trip
        if images not in (None, "url", "inline"):
            raise ApiError(422, "invalid_request", "images must be url or inline",
                           field="images")
        slots.acquire(who.client)
    except ApiError as e:
        await websocket.close(code=4000 + e.status, reason=e.message[:120])
        return
    except RedisError as e:     # the 503 an HTTP request would get
        log.warning("websocket for %s refused: Redis unavailable (%s)", job_id, e)
        await websocket.close(code=4503, reason="the job store is unreachable; retry shortly")
        return
    try:
        await _pump_ws(websocket, jobs.follow(job.id, after, first=first,
                                              inline_images=images == "inline"))
    finally:
        slots.release(who.client)


async def _pump_ws(websocket: WebSocket, events: AsyncIterator[StreamEvent]) -> None:
    """Send `events` until they end or the client leaves, then close (1000; 1013, try again
    later, if Redis went away; 1011 if the stream failed otherwise)."""

    async def pump() -> None:
        async for ev in events:
            await websocket.send_text(ev.as_message())

    async def drain() -> None:      # notices the client leaving; its messages are ignored
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    sender, reader = asyncio.create_task(pump()), asyncio.create_task(drain())
    done, pending = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
            await task
    if sender in done and websocket.application_state == WebSocketState.CONNECTED:
        error = sender.exception()
        code = 1000 if error is None else 1013 if isinstance(error, RedisError) else 1011
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=code)
