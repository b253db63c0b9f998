"""The model catalog: what live workers serve, read from their advertisements, and the one
lookup of a model a request names (one refusal, whatever the route).

The served models are read at most every `DDPM_MODELS_CACHE_S` seconds (and at once for a
model not among them): a POST does not read every worker's advertisement.

Past one Redis (`DDPM_REDIS_MODELS`, app/shards.py) the catalog reads every Redis: the
workers of a model advertise on its own, and a model's queues and work are read there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool
from redis import Redis

from contract.queueing import model_queue_keys, queue_counts
from contract.spec import ModelInfo
from contract.work import ModelWork, read_work
from contract.workers import known_models, live_worker_keys

from .errors import ApiError
from .settings import ApiSettings


@dataclass(frozen=True)
class Served:
    """A model and how many live workers advertise it."""

    info: ModelInfo
    workers: int


def unknown_model(name: str, served: dict[str, Served]) -> ApiError:
    """The one refusal of a model nobody serves (404 naming `model`)."""
    names = ", ".join(served) or "none (no live worker)"
    return ApiError(404, "not_found", f"model {name!r} is not served; available: {names}",
                    field="model")


def model_required(served: dict[str, Served]) -> str:
    """Why a request that names no model cannot have one (zero or several are served)."""
    return "model is required: " + (
        f"{len(served)} models are served: {', '.join(served)}" if served else
        "no model is served (no live worker)")


class Catalog:
    def __init__(self, redis: Redis, settings: ApiSettings, *,
                 redises: Sequence[Redis] = (),
                 route: Callable[[str], Redis] | None = None) -> None:
        """`redis`: the default Redis; `redises`: every Redis (default: that one) and
        `route`: a model's own (default: that one), past one Redis."""
        self.redis = redis
        self.redises = list(redises) or [redis]
        self.route = route or (lambda model: redis)
        self.settings = settings
        self._served: tuple[float, dict[str, Served]] = (-math.inf, {})

    def live_workers(self) -> list[dict[str, Any]]:
        """The advertisements of live workers (each expires unless its worker renews it)."""
        docs = []
        for redis in self.redises:
            keys = live_worker_keys(redis, time.time())
            for raw in redis.mget(keys) if keys else []:
                if raw is None:
                    continue
                try:
                    docs.append(json.loads(raw))
                except ValueError:
                    continue
        return docs

    def served_models(self) -> dict[str, Served]:
        """The models live, non-draining workers advertise, by name (read now); with
        `serve_idle_models`, also those a worker served lately (0 workers now)."""
        seen: dict[str, Served] = {}
        for doc in self.live_workers():
            if doc.get("draining"):
                continue
            for m in doc.get("models", []):
                try:
                    info = ModelInfo.from_dict(m)
                except (TypeError, KeyError):
                    continue
                prev = seen.get(info.name)
                seen[info.name] = Served(info, (prev.workers if prev else 0) + 1)
        if self.settings.serve_idle_models:       # scale to zero: known, no worker now
            known = {}
            for redis in reversed(self.redises):      # the default Redis's last: it wins
                known.update(known_models(redis))
            for name, raw in known.items():
                if name in seen:
                    continue
                try:
                    seen[name] = Served(ModelInfo.from_dict(json.loads(raw)), 0)
                except (TypeError, KeyError, ValueError):
                    continue
        served = dict(sorted(seen.items()))
        self._served = (time.monotonic(), served)
        return served

    def _cached(self) -> dict[str, Served] | None:
        at, served = self._served
        return served if time.monotonic() - at < self.settings.models_cache_s else None

    async def recent(self, want: str | None = None) -> dict[str, Served]:
        """The served models as read up to `models_cache_s` ago, unless `want` is missing
        from them (then read again, in a thread)."""
        served = self._cached()
        if served is not None and (want is None or want in served):
            return served
        return await run_in_threadpool(self.served_models)

    async def lookup(self, name: str | None) -> Served:
        """The model a request names, or the only one served when it names none: 404
        (`unknown_model`) for a model nobody serves, 422 when none is named and not exactly
        one is served."""
        served = await self.recent(name)
        if name is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise ApiError(422, "invalid_request", model_required(served), field="model")
        model = served.get(name)
        if model is None:
            raise unknown_model(name, served)
        return model

    def queued(self, model: str) -> int:
        """Jobs waiting in the model's queues."""
        with self.route(model).pipeline(transaction=False) as p:
            for key in model_queue_keys(model):
                p.llen(key)
            return sum(p.execute())

    def readiness(self) -> dict[str, object]:
        """Redis answers, and which live workers (not draining) serve which models; ready
        with one of them, or without any when idle models are served (scale to zero: the
        API must stay reachable for KEDA and take the job that wakes a worker). A
        RedisError if Redis does not answer."""
        for redis in self.redises:
            redis.ping()
        workers = [w for w in self.live_workers() if not w.get("draining")]
        return {"redis": "ok", "workers": len(workers),
                "ready": bool(workers) or self.settings.serve_idle_models,
                "models": sorted({m.get("name") for w in workers for m in w.get("models", [])
                                  if isinstance(m, dict) and m.get("name")})}

    def work(self, now: float) -> dict[str, ModelWork]:
        """The work signal per model (contract/work.py), each model's read from its own
        Redis (one Redis read per Redis)."""
        if len(self.redises) == 1:
            return read_work(self.redis, now)
        out: dict[str, ModelWork] = {}
        for redis in self.redises:
            for model, work in read_work(redis, now).items():
                if model not in out or self.route(model) is redis:
                    out[model] = work
        return dict(sorted(out.items()))

    def queue_counts(self) -> dict[str, dict[str, int]]:
        """Every queue's jobs by state (contract/queueing.py), over every Redis (a queue is
        a model's: its counts are summed should it exist on two)."""
        out: dict[str, dict[str, int]] = {}
        for redis in self.redises:
            for name, counts in queue_counts(redis).items():
                into = out.setdefault(name, dict.fromkeys(counts, 0))
                for k, v in counts.items():
                    into[k] = into.get(k, 0) + v
        return dict(sorted(out.items()))
