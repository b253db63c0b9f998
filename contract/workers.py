"""The workers' advertisements: what each live worker serves, found without a SCAN."""

from __future__ import annotations

from typing import Any

from .keys import WORKERS_INDEX, worker_key


def advertise_worker(redis: Any, name: str, doc: str, ttl: int, now: float) -> None:
    """Publish (or renew) a worker's advertisement `doc` (JSON) for `ttl` seconds."""
    with redis.pipeline(transaction=True) as p:
        p.set(worker_key(name), doc, ex=ttl)
        p.zadd(WORKERS_INDEX, {name: now + ttl})
        p.expire(WORKERS_INDEX, ttl)      # gone with the last worker
        p.execute()


def withdraw_worker(redis: Any, name: str) -> None:
    with redis.pipeline(transaction=True) as p:
        p.delete(worker_key(name))
        p.zrem(WORKERS_INDEX, name)
        p.execute()


def live_worker_keys(redis: Any, now: float) -> list[str]:
    """Advertisement keys of workers whose advertisement has not expired at `now` (epoch s);
    drops the expired names from the index on the way."""
    with redis.pipeline(transaction=False) as p:
        p.zremrangebyscore(WORKERS_INDEX, "-inf", now)
        p.zrange(WORKERS_INDEX, 0, -1)
        _, names = p.execute()
    return [worker_key(n.decode() if isinstance(n, bytes) else n) for n in names]
