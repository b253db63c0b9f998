"""The FastAPI application: `create_app(settings)`; uvicorn runs it as a factory
(`ddpm api`, `ddpm serve`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match, Mount

from contract import tracing

from . import docs, errors, openapi, redact
from .auth import KeyAuth
from .body_limit import BodyLimitMiddleware
from .disconnects import ClientGoneMiddleware
from .metrics import ApiMetrics, MetricsMiddleware
from .openai import routes as openai_images
from .openai.errors import openai_error
from .routes import generations, health, listing, models, page, work
from .settings import ApiSettings
from .shards import Shards
from .stream_slots import StreamSlots

log = logging.getLogger("ddpm.api")

DESCRIPTION = """Generate images with trained DDPM checkpoints.

Submit with `POST /v1/generations`, then poll `GET /v1/generations/{id}`, or follow it live
over Server-Sent Events (`/events`) or a WebSocket (`/ws`); download each image, a grid, or
an animation of the denoising; list your jobs with `GET /v1/generations`. Errors are
`{"error": {"code", "message", "field"?}}`.

**WebSocket** (OpenAPI cannot describe one, so it is described here):
`GET /v1/generations/{id}/ws` upgraded to a WebSocket (`ws://`, or `wss://` behind TLS;
the API key, if any, in the `Authorization: Bearer` header of the upgrade request). It
sends the events of `/events`, each as one text message `{"id", "event", "data"}` (`data`
as in the SSE event; `id` the event id, `null` for an ending read from the job's status),
and ignores what it receives. Query: `?last_event_id=ID` resumes after that event, as
`Last-Event-ID` does for SSE; `?images=inline` puts the final PNGs in `image` events.
Close codes: `1000` after the terminal event (`done`, `error` or `canceled`); `4401` no or
unknown API key, `4404` unknown job (or another key's), `4422` a bad `last_event_id` or
`images`; `4429` / `4503` past the open stream limits of the caller / the server, `4503`
also while Redis is unreachable; `1013` (try again later) if Redis goes away mid-stream,
`1011` if the stream fails otherwise. Reconnect with `?last_event_id=` after anything but
`1000` and the `44xx` codes.
"""


# What a page on an allowed origin (DDPM_CORS_ORIGINS) may send and read.
CORS_METHODS = ("GET", "POST", "DELETE")
CORS_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID")
CORS_EXPOSE = ("Retry-After", "Location", "Idempotent-Replayed")


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path, asked of the routes themselves
    (Starlette's 405 names only the first route that matched the path, so `PUT
    /v1/generations` said `Allow: POST` though GET is served there too)."""
    # A Mount (static files) matches every method: its own 405 names what it serves.
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    return [m for m in HTTP_METHODS
            if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


async def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
    """Every 405, in one place: `Allow` lists all the methods of the path, in the error
    shape of the routes there."""
    allow = allowed_methods(request) or [
        m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
    headers = {**(exc.headers or {}), "Allow": ", ".join(allow)}
    message = (f"{request.method} is not allowed on {request.url.path}: use "
               f"{', '.join(allow) or 'another path'}")
    if request.url.path.startswith("/v1/images/"):
        return openai_error(405, message, code="method_not_allowed", headers=headers)
    return errors.error_response(405, "method_not_allowed", message, headers=headers)


def app_from_env() -> FastAPI:
    """The factory each API process calls when several share a port (`ddpm api --workers N`;
    `uvicorn app.main:app_from_env --factory --workers N` and gunicorn's uvicorn worker do
    the same, given PROMETHEUS_MULTIPROC_DIR): settings from the DDPM_* environment, logging
    as `ddpm api` sets it up."""
    settings = ApiSettings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return create_app(settings)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    auth = KeyAuth(settings.api_keys)
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if tracing.setup(tracing.API_SERVICE, settings.otlp_endpoint):  # contract/tracing.py
            log.info("tracing on: spans to %s", settings.otlp_endpoint)
        # The rooms routes reach Redis through (app/deps.py): once per Redis, the default
        # one (a URL, or Sentinel: contract/redis_connect.py) and each of DDPM_REDIS_MODELS
        # (app/shards.py); the catalog and the listing over all of them.
        app.state.shards = shards = Shards(settings)
        for shard in shards.all[1:]:
            log.info("models on %s (job ids %s-...): %s", shard.target.describe(), shard.tag,
                     ", ".join(shards.models_on(shard)))
        app.state.catalog = catalog = shards.catalog
        app.state.listing = shards.listing
        metrics.watch(catalog)
        if auth.open:
            log.warning("no API keys configured (DDPM_API_KEYS): the API is open to anyone "
                        "who can reach it")
        else:
            log.info("API keys required: %d configured", len(auth.digests))
        try:
            yield
        finally:
            await shards.aclose()
            metrics.close()
            tracing.shutdown()     # what is buffered goes out

    app = FastAPI(title="ddpm-serve", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None,   # app/docs.py: no CDN
                  responses={413: {"model": errors.ErrorBody, "description": "body too large"}})
    app.state.settings, app.state.auth, app.state.metrics = settings, auth, metrics
    app.state.streams = StreamSlots(settings.max_streams, settings.max_streams_per_caller,
                                    settings.retry_after, on_change=metrics.streams.set)
    errors.install(app)
    app.add_exception_handler(405, _method_not_allowed)  # type: ignore[arg-type]
    openapi.install(app)         # a valid 3.1 document (SSE's itemSchema is 3.2)
    docs.install_document(app, keys_required=not auth.open)   # no key needed when open
    docs.install_pages(app)      # /docs and /redoc from the package's files, no CDN
    redact.install()            # no Authorization header in DEBUG logs of /ws
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,  # type: ignore[arg-type]
                       upload_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    app.add_middleware(ClientGoneMiddleware)  # type: ignore[arg-type]
    if settings.cors_origins:       # outermost: a preflight is answered before the rest
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,  # type: ignore[arg-type]
                           allow_methods=list(CORS_METHODS), allow_headers=list(CORS_HEADERS),
                           expose_headers=list(CORS_EXPOSE), max_age=600)
    app.include_router(generations.router)
    app.include_router(listing.router)
    app.include_router(openai_images.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(work.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
