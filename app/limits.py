"""Back-pressure before a job is enqueued: a per-caller rate limit (fixed windows counted in
Redis, so every API replica shares them) and a cap on each model's queue depth."""

from __future__ import annotations

import time

from redis import Redis

from worker.contract import PREFIX

from .auth import Principal
from .errors import ApiError
from .jobs import JobStore
from .settings import ApiSettings


def check_rate(redis: Redis, settings: ApiSettings, who: Principal) -> None:
    """429 once the caller has made `rate_limit` submissions in the current window."""
    if not settings.rate_limit:
        return
    window = settings.rate_window
    now = time.time()
    index = int(now // window)
    key = f"{PREFIX}:rate:{who.client}:{index}"
    with redis.pipeline(transaction=True) as p:
        p.incr(key)
        p.expire(key, window + 1)
        count, _ = p.execute()
    if count > settings.rate_limit:
        retry = max(1, int((index + 1) * window - now) + 1)
        raise ApiError(429, "rate_limited", f"more than {settings.rate_limit} generations "
                       f"in {window} s; retry in {retry} s",
                       headers={"Retry-After": str(retry)})


def check_depth(store: JobStore, model: str) -> None:
    """429 when the model's queues already hold `max_queue_depth` jobs."""
    depth = store.queued(model)
    limit = store.settings.max_queue_depth
    if depth >= limit:
        raise ApiError(429, "queue_full", f"model {model!r} has {depth} queued jobs "
                       f"(limit {limit}); retry later",
                       headers={"Retry-After": str(store.settings.retry_after)})
