"""RQ's registry maintenance, as a batching worker needs it.

Each function is RQ's own pass with one change, found by a test in tests/reliability or
tests/worker and explained where it lives: a short registry-cleaning lock, a quiet group
pass, canceled jobs that expire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

from redis import Redis

from .surface import Group, Job, Queue, rq_clean_registries, worker_registration

log = logging.getLogger("ddpm.worker")


def clean_registries(redis: Redis, queues: list[Queue], exc_handlers: list[Callable[..., Any]],
                     worker: Any, lock_ttl: int) -> None:
    """RQ's pass, under a per-queue lock that expires after `lock_ttl` (one maintenance
    interval, at least 10 s) instead of RQ's 899 s: a worker SIGKILLed mid-pass leaves its
    lock behind, and while it lives no worker re-queues that queue's abandoned jobs."""
    for queue in queues:
        if redis.set(queue.registry_cleaning_key, 1, nx=True, ex=lock_ttl):
            log.debug("cleaning registries for queue %s", queue.name)
            rq_clean_registries(queue, exc_handlers)
            worker_registration.clean_worker_registry(queue)
            queue.intermediate_queue.cleanup(worker, queue)
            queue.release_maintenance_lock()


def clean_group_registries(redis: Redis, lock_ttl: int) -> None:
    """RQ's group pass (`BaseWorker.clean_group_registries`), logged at debug: RQ logs it at
    info, so `ddpm worker` said "cleaning group registries" every maintenance interval. The
    lock, as RQ's, expires just before the next interval."""
    if Group.acquire_maintenance_lock(redis, lock_ttl):
        log.debug("cleaning group registries")
        Group.clean_registries(connection=redis)


def clean_canceled(redis: Redis, queues: list[Queue], ttl: int) -> None:
    """RQ never cleans its canceled registries, and a job canceled without us (`rq`,
    `contract.queueing.cancel`) keeps its hash forever. Like finished jobs: each newly
    canceled job's hash gets the result TTL and its member is re-scored to expire with it;
    members whose job is gone are removed. Touches only members due (score ≤ now)."""
    t = time.time()
    for queue in queues:
        key = queue.canceled_job_registry.key
        due = cast("list[bytes]", redis.zrangebyscore(key, 0, t))
        if not due:
            continue
        with redis.pipeline(transaction=False) as p:
            for job_id in due:
                p.ttl(Job.key_for(job_id.decode()))
            ttls = p.execute()
        with redis.pipeline(transaction=False) as p:
            for job_id, left in zip(due, ttls, strict=True):
                if left == -2:                     # expired or deleted
                    p.zrem(key, job_id)
                    continue
                if left == -1:
                    left = ttl
                    p.expire(Job.key_for(job_id.decode()), left)
                p.zadd(key, {job_id: t + left}, xx=True)
            p.execute()
