"""Generation jobs as RQ jobs, seen from outside a worker: the API's one door to RQ.

Everything the API (and tests, benchmarks, tools) reads or writes of RQ's layout goes
through here: enqueueing (`enqueue`, or `enqueue_commands` for a caller that runs RQ's
writes in a script of its own), fetching and restoring jobs, their statuses, cancelling,
and the registry counts the metrics show. RQ's Python objects stay the source of truth:
the commands are RQ's own, recorded, and jobs are RQ's `Job`s. Torch-free: it needs only
redis and rq.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    StartedJobRegistry,
)
from rq.utils import now, utcformat
from rq.webhook import Webhook

from .keys import (
    JOB_FUNC,
    PREFIX,
    SERIALIZER,
    WAKE_MAXLEN,
    WAKE_TTL,
    cost_key,
    queue_name,
    wake_key,
)
from .limits import PRIORITIES
from .recorder import Recorder
from .spec import GenerationSpec

__all__ = ["COUNTED", "DEFAULT_RETRIES", "QUEUES_SET", "QUEUE_KEY_PREFIX", "Job", "NoSuchJob",
           "NotCancelable", "cancel",
           "cancel_job", "enqueue", "enqueue_commands", "failure_message", "fetch_job",
           "fetch_jobs", "generation_queue", "is_generation", "job_key", "job_state",
           "model_queue_keys", "queue_counts", "read_state", "reload_job", "restore_job",
           "state_of",
           "wake_commands"]

DEFAULT_RETRIES = 3   # re-queues after a worker dies mid-job (abandoned executions)

NoSuchJob = NoSuchJobError


class NotCancelable(Exception):
    """RQ refuses to cancel the job (it has ended, or is already canceled)."""


# RQ's statuses in the API's words.
_STATES = {
    JobStatus.CREATED: "queued", JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued", JobStatus.READY_TO_ENQUEUE: "queued",
    JobStatus.RATE_LIMITED: "queued", JobStatus.STARTED: "running",
    JobStatus.FINISHED: "succeeded", JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled", JobStatus.CANCELED: "canceled",
}


def job_state(rq_status: JobStatus | str | bytes | None) -> str:
    """`queued`, `running`, `succeeded`, `failed` or `canceled` for an RQ status (None, a
    job that is gone: `canceled`)."""
    if rq_status is None:
        return "canceled"
    if isinstance(rq_status, bytes):
        rq_status = rq_status.decode()
    try:
        return _STATES.get(JobStatus(rq_status), "queued")
    except ValueError:
        return "queued"


def job_key(job_id: str) -> str:
    """The job's RQ hash."""
    return Job.key_for(job_id)


STATUS_FIELD = "status"      # the job hash's field holding its RQ status


def model_queue_keys(model: str) -> list[str]:
    """The model's RQ queue lists, in dequeue order (highest priority first)."""
    return [Queue.redis_queue_namespace_prefix + queue_name(model, p) for p in PRIORITIES]


QUEUES_SET = Queue.redis_queues_keys                  # RQ's set of every queue's list key
QUEUE_KEY_PREFIX = Queue.redis_queue_namespace_prefix  # a queue's list: prefix + its name


# -- enqueueing ----------------------------------------------------------------------------


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
            webhook: str | None = None, pipeline: Pipeline | None = None,
            wake: bool = True) -> Job:
    """Put `spec` on its model's queue; the job's kwargs are the spec as JSON data.

    `webhook` becomes RQ webhooks (POST of the job's id and status) for success and failure;
    the caller vouches for the URL (the API checks it against its allow-list).

    With `pipeline`, RQ queues the job's writes (SADD rq:queues, the job hash, RPUSH onto
    the queue) and (with `wake`) the token that wakes an idle worker on it, and nothing is
    sent: the caller executes them (`enqueue_commands`).

    The job's cost in image-steps goes with it (`keys.cost_key`, expiring with its
    results): what the work signal sums over queued jobs (contract/work.py).
    """
    hooks = [Webhook(webhook, status, method="POST") for status in ("finished", "failed")] \
        if webhook else None
    own = pipeline if pipeline is not None else redis.pipeline(transaction=True)
    job = generation_queue(redis, spec).enqueue(
        JOB_FUNC, kwargs=spec.model_dump(mode="json"), job_id=job_id, result_ttl=result_ttl,
        failure_ttl=result_ttl, job_timeout=timeout, meta=meta or {}, webhooks=hooks,
        retry=Retry(max=retries) if retries else None, pipeline=own,
        description=f"generate {spec.model} ×{spec.num_images} ({spec.sampler}, {spec.steps})")
    own.set(cost_key(job.id), spec.total_steps, ex=result_ttl)
    if wake:
        wake_commands(own, spec.model)
    if pipeline is None:
        own.execute()
    return job


def enqueue_commands(redis: Redis, spec: GenerationSpec, *, wake: bool = True,
                     **kwargs: Any) -> tuple[Job, list[list[bytes]]]:
    """The job `enqueue` would make and the Redis commands that would enqueue it, encoded
    and not sent: exactly RQ's own writes, for a caller that runs them itself (the API
    runs them in the Lua script that also checks its limits: one round-trip per submit).

    RQ writes the job hash twice (its status, then every field, the status again): the
    writes to one hash that follow each other are merged into one HSET of the same fields
    and values (the later value of a field wins, as it would in Redis)."""
    encode: Callable[[Any], bytes] = redis.get_encoder().encode
    commands: list[tuple[Any, ...]] = []
    job = enqueue(redis, spec, pipeline=Recorder(redis, commands), wake=wake, **kwargs)
    return job, _merge_hsets([[encode(a) for a in args] for args in commands])


def _merge_hsets(commands: list[list[bytes]]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    for c in commands:
        prev = out[-1] if out else None
        if (prev is not None and c[0].upper() == b"HSET" == prev[0].upper()
                and c[1] == prev[1]):
            fields = dict(zip(prev[2::2], prev[3::2], strict=True))
            fields.update(zip(c[2::2], c[3::2], strict=True))
            out[-1] = [b"HSET", c[1], *(x for kv in fields.items() for x in kv)]
        else:
            out.append(c)
    return out


# -- reading jobs --------------------------------------------------------------------------


def fetch_job(redis: Redis, job_id: str) -> Job:
    """The job (NoSuchJob if its hash is gone)."""
    return Job.fetch(job_id, connection=redis, serializer=SERIALIZER)


def restore_job(redis: Redis, job_id: str, raw: dict[bytes, bytes]) -> Job:
    """The job from its hash as read (HGETALL) elsewhere, e.g. through an async client;
    bound to `redis` for what follows. Any exception: not a job RQ can read."""
    job = Job(job_id, connection=redis, serializer=SERIALIZER)
    job.restore(raw)
    return job


def reload_job(job: Job) -> Job:
    """`job` with its hash read again."""
    job.refresh()
    return job


def fetch_jobs(redis: Redis, ids: list[str]) -> list[Job | None]:
    """The jobs, in one round-trip; None for one that is gone or that RQ cannot read."""
    if not ids:
        return []
    with redis.pipeline(transaction=False) as p:
        for job_id in ids:
            p.hgetall(job_key(job_id))
        raws = p.execute()
    jobs: list[Job | None] = []
    for job_id, raw in zip(ids, raws, strict=True):
        job = None
        if raw:
            try:
                job = restore_job(redis, job_id, raw)
            except Exception:  # not a job this reader can decode
                job = None
        jobs.append(job)
    return jobs


def is_generation(job: Job) -> bool:
    """A job made by `enqueue` (its function is ours); False for one we cannot decode."""
    try:
        return job.func_name == JOB_FUNC
    except Exception:
        return False


def state_of(job: Job, *, refresh: bool = False) -> str:
    """The job's status in the API's words (`job_state`)."""
    return job_state(job.get_status(refresh=refresh))


def failure_message(job: Job) -> str | None:
    """What a failed job's latest result says went wrong, if anything."""
    result = job.latest_result()
    return result.exc_string if result and result.exc_string else None


async def read_state(aredis: Any, job_id: str) -> str | None:
    """The job's status in the API's words, read through an async client; None if the job
    hash is gone."""
    raw = await aredis.hget(job_key(job_id), STATUS_FIELD)
    return job_state(raw) if raw else None


# -- cancelling ----------------------------------------------------------------------------

# A canceled job's end: its end time and TTL, unless its hash is gone (KEYS[1]: the job
# hash; ARGV: ended_at, TTL). RQ gives a canceled job's hash no TTL (it would stay forever)
# and no end time.
_ENDED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'ended_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
"""


def cancel_job(redis: Redis, job: Job, ttl: int) -> None:
    """Cancel a queued or running job (RQ's own cancel: a worker frees its slots at its next
    step), then give its hash an end time and `ttl`; NotCancelable if RQ refuses."""
    try:
        job.cancel()
    except InvalidJobOperation as e:
        raise NotCancelable(str(e)) from None
    redis.register_script(_ENDED)(keys=[job.key], args=[utcformat(now()), ttl])


def cancel(redis: Redis, job_id: str) -> None:
    """Cancel a queued or running job; a worker frees its slots at its next step."""
    fetch_job(redis, job_id).cancel()


# -- registries, for metrics ---------------------------------------------------------------

# Jobs in a failed registry (KEYS[1]) whose status is `stopped` (ARGV[1]: the job key
# prefix): RQ files a stopped job (its stop-job / stop-execution commands) as failed; the
# API reports it canceled.
_STOPPED = """
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('HGET', ARGV[1] .. id, 'status') == 'stopped' then n = n + 1 end
end
return n
"""

COUNTED = ("queued", "running", "succeeded", "failed", "canceled")


def queue_counts(redis: Redis) -> dict[str, dict[str, int]]:
    """Per queue of ours (`ddpm.*`): its jobs by state (COUNTED), from RQ's queue list and
    registries; a stopped job counts as canceled."""
    stopped = redis.register_script(_STOPPED)
    names = sorted(n.decode() if isinstance(n, bytes) else n
                   for n in redis.smembers(Queue.redis_queues_keys))
    prefix = Queue.redis_queue_namespace_prefix
    out: dict[str, dict[str, int]] = {}
    for name in (n.removeprefix(prefix) for n in names):
        if not name.startswith(f"{PREFIX}."):
            continue
        kw: dict[str, Any] = {"name": name, "connection": redis, "serializer": SERIALIZER}
        with redis.pipeline(transaction=False) as p:
            p.llen(prefix + name)
            for reg in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry,
                        CanceledJobRegistry):
                p.zcard(reg(**kw).key)
            stopped(keys=[FailedJobRegistry(**kw).key],
                    args=[Job.redis_job_namespace_prefix], client=p)
            queued, started, finished, failed, canceled, n_stopped = p.execute()
        out[name] = dict(zip(COUNTED, (queued, started, finished, failed - n_stopped,
                                       canceled + n_stopped), strict=True))
    return out
