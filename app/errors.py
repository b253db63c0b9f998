"""One error shape everywhere: `{"error": {"code", "message", "field"?}}`.

Every exception a request can cause ends here with its status, never as a bare 500:
validation errors name the field, HTTP errors keep their status, Redis outages are 503, and
so is a Redis that is full (at `maxmemory`, it refuses writes): both with `Retry-After`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.redis_errors import redis_full

log = logging.getLogger("ddpm.api")

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
          413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
          429: "too_many_requests", 503: "unavailable"}


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ApiError(Exception):
    """Raised by routes: becomes an error response with this status, code and message."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.headers = field, headers


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status,
                        headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "steps")` → `steps`; `("header", "idempotency-key")` → `Idempotency-Key`."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        where, parts = parts[0], parts[1:]
        if where == "header" and parts:
            return "-".join(w.capitalize() for w in parts[0].replace("_", "-").split("-"))
    return ".".join(parts) if parts else None     # `""` names a key that is empty


def _validation_message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if errors and errors[0].get("type") == "json_invalid":
        return error_response(422, "invalid_request", "the request body is not valid JSON: "
                              f"{errors[0].get('ctx', {}).get('error', 'parse error')}")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _field(first.get("loc", ()))
    message = "; ".join(
        f"{f}: {_validation_message(e)}" if (f := _field(e.get("loc", ()))) else
        _validation_message(e) for e in errors[:10])
    return error_response(422, "invalid_request", message, field)


async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer to a body it cannot decode (not UTF-8): bad input, like bad JSON.
        return error_response(422, "invalid_request", "the request body is not valid JSON")
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


FULL_MESSAGE = "the job store is full (Redis is out of memory); retry shortly"
UNREACHABLE_MESSAGE = "the job store is unreachable; retry shortly"


def redis_error(exc: RedisError, retry_after: int = 5) -> ApiError:
    """The 503 a Redis error answers, logged as one line (no traceback): "full" when Redis
    refused a write at its `maxmemory` (compose runs it with `noeviction`: it refuses
    writes rather than evict our keys; reads, deletes and expiries still work), else
    "unreachable". In the OpenAI routes' shape: `from_api_error(redis_error(exc))`."""
    if redis_full(exc):
        log.warning("redis is full (maxmemory, noeviction), answering 503: %s", exc)
        message = FULL_MESSAGE
    else:
        log.error("redis error: %s", exc)
        message = UNREACHABLE_MESSAGE
    return ApiError(503, "unavailable", message, headers={"Retry-After": str(retry_after)})


def not_replicated(job_id: str, acked: int, wanted: int, timeout_ms: int,
                   retry_after: int = 5) -> ApiError:
    """The 503 of a job the primary took but fewer than `redis_wait_replicas` replicas
    acknowledged within `redis_wait_timeout_ms` (app/admission.py): not a promise, since a
    failover now would lose it; but it may survive and run. A retry with the same
    Idempotency-Key answers with that job if it did, or makes it anew if it did not."""
    log.warning("job %s: %d of %d replicas acknowledged it within %d ms, answering 503",
                job_id, acked, wanted, timeout_ms)
    return ApiError(503, "unavailable", f"job {job_id} was queued but not yet copied to "
                    f"{wanted} replica(s) of the job store ({acked} acknowledged), so it "
                    "is not acknowledged: it may still run. Retry with the same "
                    "Idempotency-Key to get it (without one, a retry may make a second job)",
                    headers={"Retry-After": str(retry_after)})


async def _on_redis(request: Request, exc: RedisError) -> JSONResponse:
    settings = getattr(request.app.state, "settings", None)
    return await _on_api_error(request, redis_error(exc, getattr(settings, "retry_after", 5)))


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(RedisError, _on_redis)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)


_ERRORS = {401: "missing or unknown API key", 404: "unknown job or model",
           413: "request body too large", 422: "invalid request; `field` names the culprit",
           429: "queue full or rate limit reached; see Retry-After",
           503: "Redis unreachable, or full (out of memory), or the job not yet on its "
                "replicas (DDPM_REDIS_WAIT_REPLICAS); see Retry-After"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in _ERRORS.items()}
# For routes whose response class is not JSON (SSE): FastAPI would document their errors
# with that class's media type, so the JSON content is spelled out.
JSON_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"description": d, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}} for s, d in _ERRORS.items()}
