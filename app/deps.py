"""FastAPI dependencies: the per-process objects hung on `app.state` at start-up (the
rooms routes reach Redis through: catalog, shards, jobs, views, listing). Past one Redis
(app/shards.py) `jobs` and `views` are those of the Redis the path's job id names; a POST
takes its model's admission from `shards`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import KeyAuth, Principal
from .catalog import Catalog
from .jobs import JobStore
from .listing import Listing
from .metrics import ApiMetrics
from .settings import ApiSettings
from .shards import MergedListing, Shards
from .stream_slots import StreamSlots
from .views import Views

_bearer = HTTPBearer(auto_error=False, description="an API key, when the service has keys")


async def caller(request: Request,
           _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None
           ) -> Principal:
    """The caller (401 when keys are configured and none valid is given). The HTTPBearer
    dependency only documents the scheme in OpenAPI; the header is checked here. These
    dependencies are `async` because they do no I/O: a sync one costs a thread-pool hop per
    request (0.35 vs 0.19 ms CPU for four of them, measured with bench/api_overhead.py)."""
    auth: KeyAuth = request.app.state.auth
    return auth.caller(request)


async def catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def jobs(request: Request) -> JobStore:
    return request.app.state.shards.by_job(request.path_params.get("job_id")).jobs


async def views(request: Request) -> Views:
    return request.app.state.shards.by_job(request.path_params.get("job_id")).views


async def shards(request: Request) -> Shards:
    return request.app.state.shards


async def listing(request: Request) -> Listing | MergedListing:
    return request.app.state.listing


async def settings(request: Request) -> ApiSettings:
    return request.app.state.settings


async def metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


async def slots(request: Request) -> StreamSlots:
    return request.app.state.streams


async def stream_slot(request: Request, who: Annotated[Principal, Depends(caller)]
                      ) -> AsyncIterator[None]:
    """Holds one of the caller's stream slots until the response has been sent (on the
    event loop, like every other use of the slots)."""
    held: StreamSlots = request.app.state.streams
    with held.hold(who.client):
        yield


Caller = Annotated[Principal, Depends(caller)]
CatalogDep = Annotated[Catalog, Depends(catalog)]
Jobs = Annotated[JobStore, Depends(jobs)]
ViewsDep = Annotated[Views, Depends(views)]
ListingDep = Annotated[Listing | MergedListing, Depends(listing)]
ShardsDep = Annotated[Shards, Depends(shards)]
Settings = Annotated[ApiSettings, Depends(settings)]
Metrics = Annotated[ApiMetrics, Depends(metrics)]
Slots = Annotated[StreamSlots, Depends(slots)]
StreamSlot = Annotated[None, Depends(stream_slot)]
