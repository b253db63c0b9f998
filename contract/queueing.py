"""Enqueueing, fetching and cancelling generation jobs as RQ jobs: the API's side of RQ.

The API builds its one-command submission from `enqueue_commands` (run inside its
admission script) and reads jobs with `fetch_job`; tests and benchmarks use `enqueue` and
`cancel`. Torch-free: it needs only redis and rq.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job
from rq.webhook import Webhook

from .keys import JOB_FUNC, SERIALIZER, WAKE_MAXLEN, WAKE_TTL, queue_name, wake_key
from .spec import GenerationSpec

DEFAULT_RETRIES = 3   # re-queues after a worker dies mid-job (abandoned executions)


def wake_commands(pipe: Any, model: str) -> None:
    """Queue on `pipe` the writes that wake one idle worker of `model`."""
    key = wake_key(model)
    pipe.rpush(key, 1)
    pipe.ltrim(key, -WAKE_MAXLEN, -1)
    pipe.expire(key, WAKE_TTL)


def generation_queue(redis: Redis, spec: GenerationSpec) -> Queue:
    return Queue(queue_name(spec.model, spec.priority), connection=redis, serializer=SERIALIZER)


def enqueue(redis: Redis, spec: GenerationSpec, *, job_id: str | None = None,
            result_ttl: int = 24 * 3600, retries: int = DEFAULT_RETRIES,
            timeout: int = 3600, meta: dict[str, Any] | None = None,
            webhook: str | None = None, pipeline: Pipeline | None = None) -> Job:
    """Put `spec` on its model's queue; the job's kwargs are the spec as JSON data.

    `webhook` becomes RQ webhooks (POST of the job's id and status) for success and failure;
    the caller vouches for the URL (the API checks it against its allow-list).

    With `pipeline`, RQ queues the job's writes (SADD rq:queues, the job hash, RPUSH onto
    the queue) and the token that wakes an idle worker on it and nothing is sent: the
    caller executes them (`enqueue_commands`).
    """
    hooks = [Webhook(webhook, status, method="POST") for status in ("finished", "failed")] \
        if webhook else None
    own = pipeline if pipeline is not None else redis.pipeline(transaction=True)
    job = generation_queue(redis, spec).enqueue(
        JOB_FUNC, kwargs=spec.model_dump(mode="json"), job_id=job_id, result_ttl=result_ttl,
        failure_ttl=result_ttl, job_timeout=timeout, meta=meta or {}, webhooks=hooks,
        retry=Retry(max=retries) if retries else None, pipeline=own,
        description=f"generate {spec.model} ×{spec.num_images} ({spec.sampler}, {spec.steps})")
    wake_commands(own, spec.model)
    if pipeline is None:
        own.execute()
    return job


def enqueue_commands(redis: Redis, spec: GenerationSpec, **kwargs: Any
                     ) -> tuple[Job, list[list[bytes]]]:
    """The job `enqueue` would make and the Redis commands that would enqueue it, encoded
    and not sent: exactly RQ's own writes, for a caller that runs them itself (the API
    runs them in the Lua script that also checks its limits: one round-trip per submit)."""
    encode = redis.get_encoder().encode
    with redis.pipeline(transaction=False) as p:
        job = enqueue(redis, spec, pipeline=p, **kwargs)
        commands = [[encode(a) for a in args] for args, _ in p.command_stack]
    return job, commands


def fetch_job(redis: Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis, serializer=SERIALIZER)


def cancel(redis: Redis, job_id: str) -> None:
    """Cancel a queued or running job; a worker frees its slots at its next step."""
    fetch_job(redis, job_id).cancel()
