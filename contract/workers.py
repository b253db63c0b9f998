"""The workers' advertisements: what each live worker serves, found without a SCAN."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .keys import KNOWN_MODELS, WORKERS_INDEX, worker_key

# How long a model stays known once no worker serves it: a deployment scaled to zero for
# longer forgets it (its API then refuses the model until a worker serves it again).
KNOWN_MODELS_TTL = 30 * 24 * 3600


def advertise_worker(redis: Any, name: str, doc: str, ttl: int, now: float,
                     models: Mapping[str, str] | None = None) -> None:
    """Publish (or renew) a worker's advertisement `doc` (JSON) for `ttl` seconds, and
    remember `models` (name → its ModelInfo as JSON) beyond it: an API that queues jobs
    for a model no live worker serves now (`DDPM_SERVE_IDLE_MODELS`, scale to zero) knows
    the model's shape from there."""
    with redis.pipeline(transaction=True) as p:
        p.set(worker_key(name), doc, ex=ttl)
        p.zadd(WORKERS_INDEX, {name: now + ttl})
        p.expire(WORKERS_INDEX, ttl)      # gone with the last worker
        if models:
            p.hset(KNOWN_MODELS, mapping=dict(models))
            p.expire(KNOWN_MODELS, KNOWN_MODELS_TTL)
        p.execute()


def known_models(redis: Any) -> dict[str, str]:
    """Every model a worker served within KNOWN_MODELS_TTL: name → its ModelInfo as JSON."""
    raw = redis.hgetall(KNOWN_MODELS) or {}
    return {(k.decode() if isinstance(k, bytes) else str(k)):
            (v.decode() if isinstance(v, bytes) else str(v)) for k, v in raw.items()}


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
