"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with the statuses
the `openai` SDK maps to its exception classes (a native 422 is OpenAI's 400), and the
route class whose every error, its dependencies' and its body validation's included, comes
in that shape."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ApiError, _field, _validation_message, redis_error

log = logging.getLogger("ddpm.api")

# Native request fields under the names these routes use.
PARAMS = {"num_images": "n", "init_image": "image", "class_label": "prompt"}
NO_RETRY = {"x-should-retry": "false"}    # the SDK obeys this header over its own policy


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """The body of every error response of the `/v1/images` routes (OpenAI's shape)."""

    error: OpenAIErrorDetail


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          403: "invalid_request_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "requests"}
_CODES = {"invalid_request": "invalid_value", "unauthorized": "invalid_api_key",
          "rate_limited": "rate_limit_exceeded", "bad_request": "invalid_value"}
_PYDANTIC_CODES = {"missing": "missing_required_parameter",
                   "extra_forbidden": "unknown_parameter"}


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> tuple[int, dict[str, Any]]:
    """The status (a 422 is OpenAI's 400) and body of an error in OpenAI's shape."""
    status = 400 if status == 422 else status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = OpenAIErrorBody(error=OpenAIErrorDetail(message=message, type=kind, param=param,
                                                   code=code))
    return status, body.model_dump()


def openai_error(status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None
                 ) -> JSONResponse:
    """An error response in OpenAI's shape; a 422 becomes OpenAI's 400."""
    status, body = error_body(status, message, param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def param(field: str | None) -> str | None:
    return PARAMS.get(field, field) if field is not None else None


def rename(message: str) -> str:
    """`message` naming the fields as the client sent them."""
    for native, ours in PARAMS.items():
        message = message.replace(native, ours)
    return message


def api_error_body(e: ApiError) -> tuple[int, dict[str, Any]]:
    """`e` in OpenAI's shape (status, body)."""
    p = param(e.field)
    code = _CODES.get(e.code, e.code)
    if e.status == 404 and p == "model":
        code = "model_not_found"
    return error_body(e.status, rename(e.message), param=p, code=code)


def from_api_error(e: ApiError) -> JSONResponse:
    status, body = api_error_body(e)
    return JSONResponse(body, status_code=status, headers=e.headers)


def _from_validation(e: RequestValidationError | ValidationError) -> JSONResponse:
    errors = list(e.errors())
    if errors and errors[0].get("type") == "json_invalid":
        return openai_error(400, "the request body is not valid JSON", code="invalid_json")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    parts = []
    for err in errors[:10]:
        f = param(_field(err.get("loc", ())))
        text = rename(_validation_message(err))
        parts.append(f"{f}: {text}" if f else text)
    return openai_error(400, "; ".join(parts), param=param(_field(first.get("loc", ()))),
                        code=_PYDANTIC_CODES.get(str(first.get("type")), "invalid_value"))


def error_for(exc: Exception) -> JSONResponse:
    """What an exception raised while serving one of these routes answers."""
    if isinstance(exc, ApiError):
        return from_api_error(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return openai_error(exc.status_code, detail, headers=getattr(exc, "headers", None))
    if isinstance(exc, RedisError):
        return from_api_error(redis_error(exc))
    log.exception("unhandled error", exc_info=exc)
    return openai_error(500, "internal error", code="internal_error")


class OpenAIRoute(APIRoute):
    """A route whose errors, its dependencies' (the API key) and its body validation's
    included, come in OpenAI's shape; the rest of the API keeps its own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                return error_for(e)

        return route


_OPENAI_ERRORS = {
    400: "invalid parameter; `param` names it (OpenAI's 400 where the native API says 422)",
    401: "missing or unknown API key", 404: "unknown model", 409: "the job was canceled",
    413: "request body too large", 429: "rate limit, queue full or too many open waits; "
    "see Retry-After", 500: "the generation failed", 503: "Redis unreachable or full (out of "
    "memory), or the server holds too many open waits",
    504: "the job did not end within DDPM_IMAGES_TIMEOUT_S; it is canceled"}
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": OpenAIErrorBody, "description": d} for s, d in _OPENAI_ERRORS.items()}
