"""Clients that leave mid-stream are normal, not errors.

When a streaming client disconnects, a response's task group can fail on its closed
memory streams (`anyio.BrokenResourceError`: FastAPI's SSE keep-alive task did, fastapi
discussion #15725, when the event routes used it; app/sse.py no longer does); uvicorn
would log that as an unhandled exception for every closed browser tab. Only exception groups made of
nothing but such errors are swallowed; everything else propagates as before.
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("ddpm.api")

_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


class ClientGoneMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except* _GONE:
            log.debug("client left %s mid-response", scope.get("path"))
