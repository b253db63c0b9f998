"""Back-pressure before a job is enqueued: a per-caller rate limit (fixed windows counted in
Redis, so every API replica shares them) and a cap on each model's queue depth.

Both are checked in the same Lua script that enqueues the job (`JobStore.submit`), so a
submission is one Redis round-trip and the cap holds exactly under concurrent submissions.
This module names the keys and words the refusals.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.keys import rate_key

from .auth import Principal
from .errors import ApiError
from .settings import ApiSettings


@dataclass(frozen=True)
class RateWindow:
    """The caller's current fixed window: its counter key, and seconds until it ends."""

    key: str
    ttl: int            # the counter's expiry: the window and a second of slack
    retry_after: int

    @classmethod
    def at(cls, settings: ApiSettings, who: Principal, now: float) -> RateWindow:
        window = settings.rate_window
        index = int(now // window)
        return cls(key=rate_key(who.client, index), ttl=window + 1,
                   retry_after=max(1, int((index + 1) * window - now) + 1))


def rate_limited(settings: ApiSettings, window: RateWindow) -> ApiError:
    """429 once the caller has made `rate_limit` submissions in the current window."""
    return ApiError(429, "rate_limited", f"more than {settings.rate_limit} generations in "
                    f"{settings.rate_window} s; retry in {window.retry_after} s",
                    headers={"Retry-After": str(window.retry_after)})


def queue_full(settings: ApiSettings, model: str, depth: int) -> ApiError:
    """429 when the model's queues already hold `max_queue_depth` jobs."""
    return ApiError(429, "queue_full", f"model {model!r} has {depth} queued jobs "
                    f"(limit {settings.max_queue_depth}); retry later",
                    headers={"Retry-After": str(settings.retry_after)})
