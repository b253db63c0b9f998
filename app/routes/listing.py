"""`GET /v1/generations`: the caller's own jobs, newest first, in bounded pages."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from ..deps import Caller, ListingDep
from ..errors import ERROR_RESPONSES
from ..listing import CURSOR_PATTERN
from ..schemas import GenerationList, Status

router = APIRouter(prefix="/v1/generations", tags=["generations"])

MAX_LIMIT = 100


@router.get("", response_model=GenerationList, responses=ERROR_RESPONSES,
            summary="Your generations, newest first")
def list_generations(
    who: Caller, listing: ListingDep,
    status: Annotated[list[Status] | None, Query(
        max_length=5, description="only generations in this status (repeat for several)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many")] = 20,
    cursor: Annotated[str | None, Query(
        max_length=81, pattern=CURSOR_PATTERN,
        description="`next_cursor` of the previous page")] = None,
) -> Response:
    """The jobs created with the caller's key (all jobs made while the service runs without
    keys), newest first, each as `GET /v1/generations/{id}` reports it. Jobs created within
    the last `DDPM_RESULT_TTL` seconds that still exist, at most `DDPM_MAX_LISTED_JOBS` per
    caller. Follow `next_cursor` until it is `null`: a page filtered by status looks at a
    bounded number of jobs, so it may hold fewer than `limit` items, even none."""
    views, next_cursor = listing.page(who, status, limit, cursor)
    page = GenerationList(generations=views, next_cursor=next_cursor)
    return Response(page.model_dump_json(by_alias=True), media_type="application/json")
