"""OpenAI's Images API: `POST /v1/images/generations`, `/edits` and `/variations`.

Each request becomes a native generation job, through the same catalog lookup, checks,
queue, limits and metrics as `POST /v1/generations`, and waits for it: the answer is
OpenAI's `{created, data, usage}`, or with `stream` its Server-Sent Events.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from ..deps import Caller, CatalogDep, Metrics, Settings, ShardsDep, Slots
from .errors import OPENAI_ERROR_RESPONSES, OpenAIRoute
from .forms import EDIT_FORM, VARIATION_FORM, read_form
from .mapping import VARIATION_STRENGTH, check_size, class_label, knobs, native_request
from .models import (
    STREAM_RESPONSE,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
)
from .output import Output
from .wait import Front, answer

router = APIRouter(prefix="/v1/images", tags=["images (OpenAI)"], route_class=OpenAIRoute)

_ANSWER = {200: {"description": "the images; with `stream: true`, Server-Sent Events",
                 "content": {"application/json": {}, **STREAM_RESPONSE}}}
_JSON_ANSWER = {200: {"description": "the images"}}


async def _front(shards: ShardsDep, slots: Slots, settings: Settings,
                 metrics: Metrics) -> Front:
    return Front(shards, slots, settings, metrics)


FrontDep = Annotated[Front, Depends(_front)]


@router.post("/generations", response_model=ImagesResponse, summary="Create images (OpenAI)",
             responses=OPENAI_ERROR_RESPONSES | _ANSWER)
async def create_images(body: ImageGenerationRequest, request: Request, who: Caller,
                        catalog: CatalogDep, front: FrontDep) -> Response:
    """OpenAI's `images.generate`: `prompt` names a class of a class-conditional model
    (`"7"`, `"airplane"`), or is empty for unconditional generation. Waits for the job
    (at most `DDPM_IMAGES_TIMEOUT_S`; a client that leaves cancels it)."""
    model = await catalog.lookup(body.model)
    out = Output("image_generation", model.info, body, str(request.base_url))
    check_size(body.size, model.info)
    fields = knobs(body, model.info, class_label=class_label(body.prompt, model.info),
                   guidance_scale=body.guidance_scale)
    partial = (body.partial_images or 0) if body.stream else 0
    req = native_request(model.info, fields, partial, front.settings.stream_max_bytes)
    return await answer(request, front, who, model, req, out, stream=bool(body.stream),
                        partial_images=partial)


@router.post("/edits", response_model=ImagesResponse, summary="Edit an image (OpenAI)",
             responses=OPENAI_ERROR_RESPONSES | _ANSWER,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": EDIT_FORM}}}})
async def edit_image(request: Request, who: Caller, catalog: CatalogDep,
                     front: FrontDep) -> Response:
    """OpenAI's `images.edit`: with a `mask`, inpainting (RePaint: the unmasked pixels
    are kept exactly); without, img2img (SDEdit) at `strength` [0.75]. `prompt` as for
    generations. Streams `image_edit.*` events with `stream`."""
    body = await read_form(request, ImageEditRequest)
    model = await catalog.lookup(body.model)
    out = Output("image_edit", model.info, body, str(request.base_url))
    check_size(body.size, model.info)
    fields = knobs(body, model.info, class_label=class_label(body.prompt, model.info),
                   guidance_scale=body.guidance_scale, init_image=body.image,
                   mask=body.mask, strength=body.strength, jump_length=body.jump_length,
                   jump_n_sample=body.jump_n_sample)
    partial = (body.partial_images or 0) if body.stream else 0
    req = native_request(model.info, fields, partial, front.settings.stream_max_bytes)
    return await answer(request, front, who, model, req, out, stream=bool(body.stream),
                        partial_images=partial)


@router.post("/variations", response_model=ImagesResponse,
             summary="Variations of an image (OpenAI)",
             responses=OPENAI_ERROR_RESPONSES | _JSON_ANSWER,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": VARIATION_FORM}}}})
async def vary_image(request: Request, who: Caller, catalog: CatalogDep,
                     front: FrontDep) -> Response:
    """OpenAI's `images.create_variation`: img2img of `image` with no class, at
    `strength` 0.4 unless the request gives one."""
    body = await read_form(request, ImageVariationRequest)
    model = await catalog.lookup(body.model)
    out = Output("image_generation", model.info, body, str(request.base_url))
    check_size(body.size, model.info)
    fields = knobs(body, model.info, init_image=body.image,
                   strength=body.strength or VARIATION_STRENGTH)
    req = native_request(model.info, fields, 0)
    return await answer(request, front, who, model, req, out, stream=False,
                        partial_images=0)
