"""RQ's bookkeeping for many jobs at once, and the workarounds a batching worker needs.

RQ stays the source of truth: every job gets RQ's own execution, registries, status,
result and heartbeats, in RQ's own layout; only how they reach Redis changes. RQ does a
job's bookkeeping one job at a time, several round-trips each; here a step's takes are
fetched by one script and marked started by another, a step's successes recorded by one
(layout.py: RQ's writes, a few arguments per job), every live execution renewed in one
pipeline. The rare paths (failure, retry, dependents, callbacks, repeats) are RQ's own.

The workarounds (each found by a test in tests/reliability, and explained where it lives):
the atomic take into RQ's intermediate list, marking started only where no cancel came first,
putting back jobs taken as Redis went away, pruning dead executions, failing unreadable job
hashes (the maintenance ones are in registries.py). Internal to the RQ side:
`RqSide` (side.py) is what the rest of the worker calls.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar
from uuid import uuid4

from redis import Redis

from ..redis_batch import PackedScript
from .layout import HGET_EACH, TAKE, Layout, SuccessArgs, return_value
from .surface import (
    BaseRegistry,
    Execution,
    ExecutionRegistry,
    FinishedJobRegistry,
    Job,
    JobStatus,
    Queue,
    StartedJobRegistry,
    now,
    parse_job_id,
    resolve_serializer,
    utcformat,
    validate_job_id,
)

log = logging.getLogger("ddpm.worker")

_TICK = timedelta(microseconds=1)      # RQ's timestamps' resolution

_resolve_serializer = functools.cache(resolve_serializer)
# Where RQ's own code sends a job's webhooks (its failure path; jobs abandoned past their
# retries, found by the maintenance pass): (job, status, error) → the worker's sender.
Notify = Callable[[Job, str, "str | None"], None]
_R = TypeVar("_R", bound=BaseRegistry)


class BatchJob(Job):
    """RQ's Job, with its started and finished registries made once per queue: RQ builds a
    new registry object at every use (and checks its serializer against a typing Protocol,
    ~35 µs each), several times per job on the worker's hot path. Registry objects hold only
    their key, connection and serializer, so the jobs of one queue can share them.

    Use `bound_job_class`: each RQ side gets its own subclass, holding its registries and
    where its webhooks go, so two workers in one process share nothing."""

    _shared: ClassVar[dict[tuple[type, str, int], Any]] = {}
    _notify: ClassVar[Notify | None] = None

    def __init__(self, id: str | None = None, connection: Redis | None = None,
                 serializer: Any = None) -> None:
        """RQ's, its serializer resolved once, not per job (RQ checks it against a typing
        Protocol, ~11 µs); RQ's __init__ uses the argument only to set `serializer`."""
        try:
            resolved = _resolve_serializer(serializer)
        except TypeError:       # unhashable: resolved each time, as RQ does
            resolved = resolve_serializer(serializer)
        super().__init__(id, connection=connection)
        self.serializer = resolved

    def _registry(self, kind: type[_R]) -> _R:
        key = (kind, self.origin, id(self.connection))
        registry = self._shared.get(key)
        if registry is None:
            registry = self._shared[key] = kind(self.origin, connection=self.connection,
                                                job_class=self.__class__,
                                                serializer=self.serializer)
        return registry

    @property
    def started_job_registry(self) -> StartedJobRegistry:
        return self._registry(StartedJobRegistry)

    @property
    def finished_job_registry(self) -> FinishedJobRegistry:
        return self._registry(FinishedJobRegistry)

    def send_webhooks(self, status: str | JobStatus, *, exc_string: str | None = None) -> None:
        """RQ's webhook calls go to the worker's sender (signed, retried, on its own
        threads), never RQ's urlopen on the loop's thread. None bound: none are sent."""
        notify = type(self)._notify
        if notify is not None:
            notify(self, JobStatus(status).value, exc_string)


def bound_job_class(notify: Notify | None) -> type[BatchJob]:
    """A BatchJob subclass of one RQ side: its own registry cache and webhook target."""
    return type("BatchJob", (BatchJob,), {"_shared": {}, "_notify": staticmethod(notify)
                                          if notify is not None else None})


class Unreadable(Exception):
    """A taken job whose hash RQ cannot load: it fails by hand, nothing else can run it."""

    def __init__(self, job_id: str, queue: Queue, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.job_id, self.queue = job_id, queue


@dataclass
class Started:
    """A job marked started: RQ's job, its queue and the execution this worker runs."""

    job: Job
    queue: Queue
    execution: Execution


@dataclass
class Success:
    """A job to mark succeeded, with what RQ records as its return value."""

    job: Job
    queue: Queue
    execution: Execution
    result: dict[str, Any]
    meta: bytes | None = None       # the job's meta to store with its success, if changed


class RqJobs:
    """RQ's job bookkeeping for `worker`, batched per step."""

    def __init__(self, worker: Any) -> None:
        """`worker`: RQ's worker object (worker_object.RqWorker)."""
        self.worker = worker
        self.redis: Redis = worker.connection
        self._take = PackedScript(self.redis, TAKE)
        self._layout = Layout(self.redis)
        self._hget_each = PackedScript(self.redis, HGET_EACH)

    # -- taking and starting -----------------------------------------------------------

    def take(self, queues: list[Queue], want: int, wake_keys: tuple[str, ...] = (),
             look: bool = True) -> tuple[list[tuple[Job, Queue]], list[Unreadable]]:
        """Up to `want` jobs in priority order, moved atomically from their queues into the
        queues' intermediate lists (where RQ's maintenance finds them if this worker dies
        before they are marked started), fetched in one round-trip.

        RQ pops with plain LPOP/BLPOP when a worker listens on several queues (ours listens
        on one per model and priority): a worker killed between that pop and marking the
        job started lost the job for good (3 of 48 in test_worker_chaos.py's admission
        test). The jobs' hashes come back with them, in the same round-trip. Jobs whose
        hash is gone leave the intermediate list; jobs whose hash cannot be read come back
        as `Unreadable`, to be failed.

        `wake_keys`: the wake lists of these queues' models; without `look`, the queues are
        looked at only if one of them holds a token (an enqueue since the last take).
        """
        keys = [k for q in queues for k in (q.key, q.intermediate_queue_key)] + list(wake_keys)
        hit = self._take(keys=keys, args=[want, Job.redis_job_namespace_prefix,
                                          ExecutionRegistry.key_template.format(""),
                                          len(wake_keys), int(look)])
        if not hit:
            return [], []
        by_key = {q.key: q for q in queues}
        replies = [(by_key[_text(hit[i])], _text(hit[i + 1]), hit[i + 2], hit[i + 3])
                   for i in range(0, len(hit), 4)]
        taken, bad, gone = [], [], []
        stale: dict[str, list[str]] = {}
        for queue, job_id, flat, executions in replies:
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            if not raw:                       # expired or deleted meanwhile: forget it
                gone.append((queue, job_id))
                continue
            try:
                job = self.worker.job_class(parse_job_id(job_id), connection=self.redis,
                                            serializer=self.worker.serializer)
                job.restore(raw)
            except Exception as e:
                bad.append(Unreadable(job_id, queue, e))
                continue
            taken.append((job, queue))
            if executions:
                stale[job_id] = [_text(e) for e in executions]
        if gone:
            with self.redis.pipeline(transaction=False) as p:
                for queue, job_id in gone:
                    p.lrem(queue.intermediate_queue_key, 1, job_id)
                p.execute()
        if stale:
            self._prune_dead_executions(stale)
        return taken, bad

    def _prune_dead_executions(self, ids: dict[str, list[str]]) -> None:
        """Drop expired executions (a killed worker's) from re-run jobs' execution
        registries. RQ keeps their entries ~60 s past the execution itself, and meanwhile
        `job.cancel()` of the re-run job raises ValueError: "Execution ... not found"."""
        flat = [(job_id, e) for job_id, es in ids.items() for e in es]
        with self.redis.pipeline(transaction=False) as p:
            for job_id, e in flat:
                p.exists(Execution(e, job_id, self.redis).key)
            alive = p.execute()
        with self.redis.pipeline(transaction=False) as p:
            for (job_id, e), a in zip(flat, alive, strict=True):
                if not a:
                    p.zrem(ExecutionRegistry.key_template.format(job_id), e)
            p.execute()

    def start(self, taken: list[tuple[Job, Queue]]) -> tuple[list[Started], list[Job]]:
        """RQ's bookkeeping before jobs run (an execution each, `prepare_job_execution`),
        for all of `taken` in one atomic round-trip (layout: RQ's writes, by one
        script), but never over a cancellation: RQ writes `started` unconditionally, so a
        cancel between the take and here was lost (the job ran to success after its
        DELETE said canceled). Each job's writes are guarded by its status when they run;
        the jobs canceled (or deleted) since their take come back apart, untouched. Every
        job leaves its queue's intermediate list."""
        w = self.worker
        candidates = []
        when = now() - _TICK
        for job, queue in taken:
            # Each job its own start, in take order, as RQ's one-at-a-time starts have
            # (a job put back to its queue's front is seen to start first).
            when = max(now(), when + _TICK)
            execution = Execution(uuid4().hex, job.id, self.redis, worker_name=w.name)
            execution.created_at = execution.last_heartbeat = when
            candidates.append(Started(job, queue, execution))
        ran = self._layout.start(w, [(s.job.id, s.execution.id, s.queue.intermediate_queue_key,
                                      s.job.started_job_registry.key, s.execution.created_at)
                                     for s in candidates], w.execution_ttl, w.execution_ttl)
        started = [s for s, ok in zip(candidates, ran, strict=True) if ok]
        for s in started:           # what prepare_for_execution sets on the job object
            job, when = s.job, s.execution.created_at
            job.worker_name, job.last_heartbeat, job.started_at = w.name, when, when
            job._status = JobStatus.STARTED
            w.executions[s.execution.id] = s.execution
        return started, [s.job for s, ok in zip(candidates, ran, strict=True) if not ok]

    def put_back(self, job: Job, queue: Queue) -> None:
        """A job taken just as Redis went away, before it was marked started, is in no
        queue and no registry: only this worker knows it, so it goes back in front."""
        w = self.worker
        with self.redis.pipeline() as p:
            for execution in [e for e in w.executions.values() if e.job_id == job.id]:
                w.cleanup_execution(job, p, execution)    # half-made, if any
            queue.enqueue_job(job, pipeline=p, at_front=True)
            p.lrem(queue.intermediate_queue_key, 1, job.id)
            p.execute()

    # -- ending --------------------------------------------------------------------------

    def succeed(self, jobs: list[Success]) -> list[Job]:
        """RQ's success bookkeeping (`handle_job_success`: result, finished registry, TTLs,
        worker counters, execution cleanup) for all of `jobs` in one atomic round-trip
        (layout: RQ's writes, by one script). Jobs with dependents, repeats, success
        callbacks, a rate limit or a result TTL RQ deletes or keeps oddly (never ours, but
        RQ lets anyone add them) take RQ's own path; whether a job has dependents is decided
        inside the script, so one added meanwhile is never missed. Returns the jobs that
        succeeded here, not through RQ's own path (which sends their webhooks itself)."""
        if not jobs:
            return []
        w = self.worker
        ended = now()
        own, theirs, args = [], [], []
        for s in jobs:
            job = s.job
            job.ended_at = ended
            ttl = job.get_result_ttl(w.default_result_ttl)
            if job.repeats_left or job._success_callback_name or job.rate_limit_key \
                    or not (ttl > 0 or ttl == -1):
                theirs.append(s)
                continue
            started = job.started_at or ended
            args.append(SuccessArgs(
                job.id, s.execution.id, job.started_job_registry.key,
                job.finished_job_registry.key, ttl, return_value(job.serializer, s.result),
                s.execution.created_at.timestamp(), (ended - started).total_seconds(),
                s.meta or ""))
            own.append(s)
        ran = self._layout.succeed(w, args, ended) if args else []
        for s, ok in zip(own, ran, strict=True):
            if ok:
                s.job._status = JobStatus.FINISHED
                w.executions.pop(s.execution.id, None)
            else:
                theirs.append(s)
        for s in theirs:
            if s.meta:
                self.redis.hset(s.job.key, "meta", s.meta)
            s.job._result = s.result
            w._finalize_success(s.job, s.queue, s.execution, s.result)
        done = {id(s) for s in theirs}
        return [s.job for s in own if id(s) not in done]

    def release(self, job: Job, execution: Execution) -> None:
        """End an execution without recording an outcome (canceled, or re-queued)."""
        with self.redis.pipeline() as p:
            self.worker.cleanup_execution(job, p, execution)
            p.execute()

    def fail_unreadable(self, bad: Unreadable, ttl: int) -> None:
        """Fail, by hand, a taken job whose hash RQ cannot load (its status, the failed
        registry): none of RQ's job methods work on it."""
        self.redis.lrem(bad.queue.intermediate_queue_key, 1, bad.job_id)
        try:
            validate_job_id(bad.job_id)
        except (TypeError, ValueError):
            return                      # not even a job id: nothing to mark
        with self.redis.pipeline() as p:
            p.hset(Job.key_for(bad.job_id), mapping={"status": JobStatus.FAILED.value,
                                                     "ended_at": utcformat(now())})
            p.expire(Job.key_for(bad.job_id), ttl)
            p.zadd(bad.queue.failed_job_registry.key, {bad.job_id: time.time() + ttl})
            p.execute()

    def statuses(self, jobs: list[Job]) -> list[bytes | None]:
        """Each job's status as stored now (None: the hash is gone), in one round-trip."""
        if not jobs:
            return []
        return list(self._hget_each(keys=[j.key for j in jobs], args=["status"]))

    # -- liveness ------------------------------------------------------------------------

    def heartbeat(self, live: list[tuple[Job, Execution]]) -> None:
        """`maintain_heartbeats` for every live execution in one pipeline (the worker's own
        heartbeat when none): a slow step never makes a live job look abandoned."""
        w = self.worker
        if not live:
            w.heartbeat()
            return
        worker_ttl = w.job_monitoring_interval + 60
        with self.redis.pipeline() as p:
            w.heartbeat(worker_ttl, pipeline=p)
            marks = []
            for job, execution in live:
                started = job.started_at
                working = (now() - started).total_seconds() if started else 0.0
                ttl = int(w.get_heartbeat_ttl(job, working_time=working))
                execution.heartbeat(job.started_job_registry, ttl, pipeline=p)
                marks.append((len(p), job))
                job.heartbeat(now(), ttl, pipeline=p, xx=True)
            results = p.execute()
            # As RQ's: an HSET that created the hash means the job (or the worker's hash)
            # had gone; remove (or rebuild) what the heartbeat brought back.
            for index, job in marks:
                if results[index] == 1:
                    p.delete(job.key)
            if results[0] == 1:
                p.hset(w.key, mapping=w.serialize())
                p.expire(w.key, worker_ttl)
            if len(p):
                p.execute()


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def enqueued_wait(job: Job, started: datetime | None) -> float:
    """Seconds the job waited in its queue (0 when unknown)."""
    if job.enqueued_at is None or started is None:
        return 0.0
    return max(0.0, (started - job.enqueued_at).total_seconds())
