"""Request bodies over `max_body_bytes` get `413` in the API's error shape.

Starlette's limit (FastAPI's `max_body_size`) answers a too-large declared Content-Length
with plain text whatever the handlers say, so this small middleware does the job instead:
a declared length is refused before anything is read, and a chunked body is cut off as it
streams in (raised as an HTTPException, which the error handlers render).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from .openai_compat import openai_error


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


# The POSTs whose bodies may carry input images, and get the larger limit.
UPLOAD_PATHS = frozenset({"/v1/generations", "/v1/images/edits", "/v1/images/variations"})
OPENAI_PATHS = "/v1/images/"    # their errors in OpenAI's shape (app/openai_compat.py)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = max(max_bytes, upload_bytes or max_bytes)

    def limit(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") in UPLOAD_PATHS:
            return self.upload_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            message = f"request body exceeds {limit} bytes"
            if scope.get("path", "").startswith(OPENAI_PATHS):
                response = openai_error(413, message, code="payload_too_large")
            else:
                response = error_response(413, "payload_too_large", message)
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
