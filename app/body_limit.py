"""Request bodies: the media types each POST takes (`415`, or OpenAI's `400`, for another)
and their size (`413`), in the API's error shape.

Starlette's limit (FastAPI's `max_body_size`) answers a too-large declared Content-Length
with plain text whatever the handlers say, so this small middleware does the job instead:
a declared length is refused before anything is read, and a chunked body is cut off as it
streams in (raised as an HTTPException, which the error handlers render). Without a
`Content-Type: application/json` FastAPI would hand a JSON route the raw bytes and answer
"Input should be a valid dictionary": the middleware says what is wrong (the header) and
what to send instead, before anything is read.

A POST that may carry images (`UPLOAD_PATHS`) is read up to `upload_bytes` here; what in it
is not an image is held to `max_bytes` by `app/uploads.py`, once it knows which is which.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.inputs import MAX_INPUT_BYTES
from contract.limits import INPUT_FIELDS

from .errors import error_response
from .openai.errors import openai_error

JSON = "application/json"
MULTIPART = "multipart/form-data"
# The media types of each POST's body: the one list the checks below, UPLOAD_PATHS and the
# OpenAPI document agree on (tests/reliability/test_hostile_input.py ties it to the latter).
BODY_TYPES: dict[str, tuple[str, ...]] = {
    "/v1/generations": (JSON, MULTIPART),
    "/v1/images/generations": (JSON,),
    "/v1/images/edits": (MULTIPART,),
    "/v1/images/variations": (MULTIPART,),
}
# The POSTs whose bodies may carry input images (as files, and so as base64 in JSON too),
# and get the larger limit.
UPLOAD_PATHS = frozenset(p for p, types in BODY_TYPES.items() if MULTIPART in types)
OPENAI_PATHS = "/v1/images/"    # their errors in OpenAI's shape (app/openai/errors.py)
# How a multipart body is laid out, by route.
_PARTS = {"/v1/generations": "a JSON `request` part and the images ({}) as file parts"
          .format(", ".join(INPUT_FIELDS)),
          OPENAI_PATHS: "the image as a file part and the other fields as text parts, as "
          "the `openai` SDK sends it"}


class BodyTooLarge(HTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(413, message)


def media_type(scope: Scope) -> str | None:
    """The body's media type as FastAPI reads it (`application/*+json` is JSON), lowercased
    and without parameters; None without a Content-Type."""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            kind = value.decode("latin-1").split(";")[0].strip().lower()
            return JSON if kind.startswith("application/") and kind.endswith("+json") else kind
    return None


def unsupported(path: str, got: str | None, accepted: tuple[str, ...]) -> JSONResponse:
    """The refusal of a body that is none of `accepted`: native `415` (with `Accept-Post`),
    OpenAI's `400` (the status its SDK raises as BadRequestError) on its routes."""
    sent = f"Content-Type is {got[:100]!r}" if got else "the Content-Type header is missing"
    openai = path.startswith(OPENAI_PATHS)
    parts = _PARTS[OPENAI_PATHS if openai else path.rstrip("/")]
    how = [f"{t} ({parts})" if t == MULTIPART else t for t in accepted]
    message = f"{sent}: send the body as {', or as '.join(how)}"
    if openai:
        return openai_error(400, message, code="unsupported_media_type")
    return error_response(415, "unsupported_media_type", message,
                          headers={"Accept-Post": ", ".join(accepted)})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = max(max_bytes, upload_bytes or max_bytes)

    def limit(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") in UPLOAD_PATHS:
            return self.upload_bytes
        return self.max_bytes

    def too_large(self, scope: Scope, limit: int) -> str:
        """The 413's message: on the upload routes, in the terms of what may be large."""
        message = f"request body exceeds {limit} bytes"
        if limit == self.upload_bytes and self.upload_bytes > self.max_bytes:
            rest = ("" if scope.get("path", "").startswith(OPENAI_PATHS) else
                    f", the rest of the request {self.max_bytes} bytes")  # app/uploads.py
            message += (f" (DDPM_MAX_UPLOAD_BYTES; an image may be at most {MAX_INPUT_BYTES} "
                        f"bytes{rest})")
        return message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        accepted = BODY_TYPES.get(path.rstrip("/"))
        if scope.get("method") == "POST" and accepted is not None:
            got = media_type(scope)
            if got not in accepted:
                await unsupported(path, got, accepted)(scope, receive, send)
                return
        limit = self.limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            message = self.too_large(scope, limit)
            if path.startswith(OPENAI_PATHS):
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
                    raise BodyTooLarge(self.too_large(scope, limit))
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
