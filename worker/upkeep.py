"""What keeps a worker visible and alive beside its loop: the heartbeat thread, the
`ddpm:workers:{name}` advertisement, and riding out a Redis that is full or gone.

A side thread renews RQ's heartbeats of every live execution (RqSide.heartbeat) and the
advertisement, so a slow step never makes a live job look abandoned; if this process dies,
its executions expire and a live worker's maintenance pass re-queues the jobs (RQ Retry).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from contract.redis_errors import redis_full
from contract.workers import advertise_worker, withdraw_worker

from .metrics import WorkerMetrics
from .rqside import RqSide
from .settings import WorkerSettings

log = logging.getLogger("ddpm.worker")


class Upkeep:
    """Heartbeats, advertisement and Redis trouble of one worker."""

    def __init__(self, redis: Redis, rq: RqSide, settings: WorkerSettings,
                 metrics: WorkerMetrics, advertisement: Callable[[], dict[str, Any]],
                 running: Callable[[], int]) -> None:
        self.redis = redis
        self.rq = rq
        self.settings = settings
        self.metrics = metrics
        self._advertisement = advertisement     # the document `ddpm:workers:{name}` holds
        self._running = running                 # how many jobs run now (for the logs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats_missed = False               # a heartbeat failed since the last one worked
        self.full_since: float | None = None    # when Redis began refusing writes (maxmemory)
        self.last_beat: float | None = None     # monotonic: the last advertisement written

    # -- the heartbeat thread ----------------------------------------------------------

    def start(self) -> None:
        self.advertise()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="ddpm-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def withdraw(self) -> None:
        """The advertisement goes (the worker is stopping)."""
        with contextlib.suppress(RedisError):
            withdraw_worker(self.redis, self.rq.name)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                self.rq.heartbeat()
                self.advertise()
                if self.beats_missed:
                    # Executions were not renewed while Redis refused writes: now they are,
                    # the other workers' too within an interval; no maintenance before that.
                    self.beats_missed = False
                    self.rq.postpone_maintenance()
                if self.full_since is not None:
                    log.warning("Redis has room again after %.1fs",
                                time.monotonic() - self.full_since)
                    self.full_since = None
            except RedisError as e:
                self.beats_missed = True
                if redis_full(e):
                    self.redis_full()
                else:
                    log.error("heartbeat failed: %s", e)
            except Exception:  # the side thread must outlive any one failure
                log.exception("heartbeat thread error")

    def advertise(self) -> None:
        """`ddpm:workers:{name}`: the models this worker serves, expiring unless renewed."""
        ttl = max(15, int(3 * self.settings.heartbeat_interval))
        doc = self._advertisement()
        models = {m["name"]: json.dumps(m) for m in doc.get("models", ())}
        advertise_worker(self.redis, self.rq.name, json.dumps(doc), ttl, time.time(), models)
        self.last_beat = time.monotonic()       # readiness (worker/probes.py): Redis took it

    # -- Redis trouble -----------------------------------------------------------------

    def redis_full(self) -> None:
        """Redis refused a write for want of memory (maxmemory, noeviction). Nothing is
        dropped: the writer holds its writes and retries them, the loop soon waits for it,
        no job is taken. Executions are not renewed meanwhile, so maintenance waits one
        interval past the next successful heartbeat before any job can look abandoned
        (_beat). Called from the loop and the writer's and heartbeat threads."""
        self.metrics.redis_full.inc()
        self.beats_missed = True
        if self.full_since is None:
            self.full_since = time.monotonic()
            log.warning("Redis is full (maxmemory): %d running jobs wait for room, no new "
                        "jobs are taken", self._running())

    def wait_for_redis(self, error: RedisError, give_up: Callable[[], bool]) -> bool:
        """Redis went away mid-pass: pause (nothing could be stored anyway) until it answers,
        instead of dying with every running job. Maintenance then waits one more interval,
        so every worker renews its executions (unrenewed while Redis was down) before any of
        them can be judged abandoned and run twice. False: `give_up()` said so (asked to
        stop, the grace period over); the running jobs come back through their expiring
        executions."""
        log.error("Redis unavailable (%s): pausing until it is back", error)
        while True:
            if give_up():
                return False
            time.sleep(1)
            try:
                self.redis.ping()
            except RedisError:
                continue
            log.warning("Redis is back: resuming %d running jobs", self._running())
            self.rq.postpone_maintenance()
            return True
