"""What can go wrong, as exceptions a caller can tell apart without reading messages.

The API answers every error as `{"error": {"code", "message", "field"?}}`; `ApiError`
carries those parts and the status, and a subclass per status a caller acts on differently
(fix the key, the id, the request; wait `retry_after` seconds and try again).
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import Generation


class ClientError(Exception):
    """Base of every exception this package raises."""


class NetworkError(ClientError):
    """The server could not be reached, or the connection failed mid-request."""


class ApiError(ClientError):
    """The API refused a request: `status`, its `code` and `message`, and the request
    `field` at fault when there is one (422s name it)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        self.status, self.code, self.message = status, code, message
        self.field, self.retry_after = field, retry_after
        where = f" (field {field})" if field else ""
        super().__init__(f"{status} {code}{where}: {message}")


class AuthenticationError(ApiError):
    """401: the server requires an API key, and none or an unknown one was sent."""


class NotFoundError(ApiError):
    """404: unknown job or model (or a job of another API key)."""


class ConflictError(ApiError):
    """409: the job has already ended (cancel), or its result is not ready yet."""


class PayloadTooLargeError(ApiError):
    """413: the request body (or its images) is over the server's limit."""


class InvalidRequestError(ApiError):
    """422: a request field is out of range, unknown or does not fit the model; `field`
    names it."""


class RateLimitError(ApiError):
    """429: a queue is full or the caller is over its rate limit; retry after
    `retry_after` seconds."""


class UnavailableError(ApiError):
    """503: the server cannot reach its job store, or is past its open-stream cap."""


class StreamError(ClientError):
    """Following a job's events failed and could not be resumed within the retries."""


class WaitTimeout(ClientError, TimeoutError):
    """`wait(timeout=…)` passed before the job ended (the job goes on)."""


class GenerationError(ClientError):
    """The job ended without images: it failed or was canceled (`generation` says which
    and why)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        why = f": {generation.error}" if generation.error else ""
        super().__init__(f"generation {generation.id} {generation.status}{why}")


_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthenticationError, 404: NotFoundError, 409: ConflictError,
    413: PayloadTooLargeError, 422: InvalidRequestError, 429: RateLimitError,
    503: UnavailableError}


def retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds: a number, or an HTTP date (as seconds from now)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def api_error(status: int, body: Any, text: str, retry_after_header: str | None) -> ApiError:
    """The exception for an error response: its JSON `error` object if it has one (a proxy's
    HTML page otherwise, shortened)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = str(err.get("code") or f"http_{status}")
        message = str(err.get("message") or "")
        field = err.get("field")
    else:
        code, message, field = f"http_{status}", " ".join(text.split())[:200], None
    cls = _BY_STATUS.get(status, ApiError)
    return cls(status, code, message or code, field=field if isinstance(field, str) else None,
               retry_after=retry_after(retry_after_header))
