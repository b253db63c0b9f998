"""OpenAI's Images API: `POST /v1/images/generations`, `/edits` and `/variations`.

Each request becomes a native generation job, through the same checks, queue, limits and
metrics as `POST /v1/generations`, and waits for it: the answer is OpenAI's
`{created, data, usage}`, or with `stream` its Server-Sent Events. Shapes, errors and the
waiting itself: `app/openai_compat.py`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from contract.inputs import MAX_INPUT_BYTES

from ..auth import Principal
from ..deps import Caller, Metrics, Settings, Store
from ..jobs import JobStore, Served
from ..metrics import ApiMetrics
from ..openai_compat import (
    EDIT_FORM,
    OPENAI_ERROR_RESPONSES,
    STREAM_RESPONSE,
    VARIATION_FORM,
    VARIATION_STRENGTH,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    OpenAIRoute,
    Output,
    check_size,
    class_label,
    native_request,
    read_form,
    served_model,
)
from ..openai_wait import CLIENT_GONE, JobStream, Waiter, unless_gone
from ..schemas import GenerationRequest
from ..settings import ApiSettings
from ..stream_slots import StreamSlots
from ..uploads import fit_inputs

router = APIRouter(prefix="/v1/images", tags=["images (OpenAI)"], route_class=OpenAIRoute)

_ANSWER = {200: {"description": "the images; with `stream: true`, Server-Sent Events",
                 "content": {"application/json": {}, **STREAM_RESPONSE}}}
_JSON_ANSWER = {200: {"description": "the images"}}


async def _model(store: JobStore, name: str | None) -> Served:
    served = store.cached_models()
    if served is None or (name is not None and name not in served):
        served = await run_in_threadpool(store.recent_models, name)
    return served_model(served, name)


async def _answer(request: Request, store: JobStore, who: Principal, settings: ApiSettings,
                  metrics: ApiMetrics, model: Served, req: GenerationRequest, out: Output, *,
                  stream: bool, partial_images: int) -> Response:
    """Fit the inputs, submit (one admission, as `POST /v1/generations`), then wait for
    the job: the images as JSON, or its events as SSE."""
    inputs = await fit_inputs(req.images(), model.info)
    slots: StreamSlots = request.app.state.streams
    slots.acquire(who.client)       # 503/429 before a job is queued that nobody could await
    try:
        sub = await store.asubmit(req, who, None, inputs)
    except BaseException:
        slots.release(who.client)
        raise
    metrics.generations.labels(req.model).inc()
    waiter = Waiter(store, slots, who, sub.job, poll_ms=settings.stream_poll_ms,
                    timeout=settings.images_timeout_s)
    if stream:
        return JobStream(waiter.stream(out, req.num_images, partial_images,
                                       sub.spec.steps_per_image), waiter)
    try:
        pngs = await unless_gone(request, waiter.images(req.num_images))
    finally:
        await waiter.close()
    if pngs is None:
        return Response(status_code=CLIENT_GONE)
    body = await run_in_threadpool(out.body, sub.job.id, pngs, sub.spec.total_steps)
    return JSONResponse(body)


@router.post("/generations", response_model=ImagesResponse, summary="Create images (OpenAI)",
             responses=OPENAI_ERROR_RESPONSES | _ANSWER)
async def create_images(body: ImageGenerationRequest, request: Request, who: Caller,
                        store: Store, settings: Settings, metrics: Metrics) -> Response:
    """OpenAI's `images.generate`: `prompt` names a class of a class-conditional model
    (`"7"`, `"airplane"`), or is empty for unconditional generation. Waits for the job
    (at most `DDPM_IMAGES_TIMEOUT_S`; a client that leaves cancels it)."""
    model = await _model(store, body.model)
    out = Output("image_generation", model.info, body, str(request.base_url))
    check_size(body.size, model.info)
    label = class_label(body.prompt, model.info)
    partial = (body.partial_images or 0) if body.stream else 0
    req = native_request(model.info, _knobs(body, model.info.name, label), partial,
                         settings.stream_max_bytes)
    return await _answer(request, store, who, settings, metrics, model, req, out,
                         stream=bool(body.stream), partial_images=partial)


def _knobs(body: Any, model: str, label: int | None) -> dict[str, Any]:
    """The native request fields every route fills the same way."""
    return {"model": model, "num_images": body.n, "class_label": label,
            "guidance_scale": body.guidance_scale, "steps": body.steps,
            "sampler": body.sampler, "seed": body.seed, "priority": body.priority}


@router.post("/edits", response_model=ImagesResponse, summary="Edit an image (OpenAI)",
             responses=OPENAI_ERROR_RESPONSES | _ANSWER,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": EDIT_FORM}}}})
async def edit_image(request: Request, who: Caller, store: Store, settings: Settings,
                     metrics: Metrics) -> Response:
    """OpenAI's `images.edit`: with a `mask`, inpainting (RePaint: the unmasked pixels
    are kept exactly); without, img2img (SDEdit) at `strength` [0.75]. `prompt` as for
    generations. Streams `image_edit.*` events with `stream`."""
    body = await read_form(request, ImageEditRequest, MAX_INPUT_BYTES)
    model = await _model(store, body.model)
    out = Output("image_edit", model.info, body, str(request.base_url))
    check_size(body.size, model.info)
    label = class_label(body.prompt, model.info)
    partial = (body.partial_images or 0) if body.stream else 0
    req = native_request(model.info, {
        **_knobs(body, model.info.name, label), "init_image": body.image, "mask": body.mask,
        "strength": body.strength, "jump_length": body.jump_length,
        "jump_n_sample": body.jump_n_sample}, partial, settings.stream_max_bytes)
    return await _answer(request, store, who, settings, metrics, model, req, out,
                         stream=bool(body.stream), partial_images=partial)


@router.post("/variations", response_model=ImagesResponse,
             summary="Variations of an image (OpenAI)",
             responses=OPENAI_ERROR_RESPONSES | _JSON_ANSWER,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": VARIATION_FORM}}}})
async def vary_image(request: Request, who: Caller, store: Store, settings: Settings,
                     metrics: Metrics) -> Response:
    """OpenAI's `images.create_variation`: img2img of `image` with no class, at
    `strength` 0.4 unless the request gives one."""
    body = await read_form(request, ImageVariationRequest, MAX_INPUT_BYTES)
    model = await _model(store, body.model)
    out = Output("image_generation", model.info, body, str(request.base_url))
    check_size(body.size, model.info)
    req = native_request(model.info, {
        "model": model.info.name, "num_images": body.n, "steps": body.steps,
        "sampler": body.sampler, "seed": body.seed, "priority": body.priority,
        "init_image": body.image, "strength": body.strength or VARIATION_STRENGTH}, 0)
    return await _answer(request, store, who, settings, metrics, model, req, out,
                         stream=False, partial_images=0)
