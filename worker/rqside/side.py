"""The one door between the batching loop and RQ.

RQ stays the source of truth for job state (queues, executions, registries, results,
`rq info`, rq-dashboard, `rq` commands), and this module and the other `worker/rqside/`
are the only ones that import it. The loop speaks to `RqSide` in plain values: job ids,
queue names, the request spec as a dict, result dicts, and callables for `rq`'s commands;
no RQ object leaves the RQ side, and the RQ side holds no reference to the loop.

Inside: RQ's worker object (worker_object.py: registration, state, heartbeat, maintenance,
the command channel), the batched bookkeeping (jobs.py), and the RQ objects of the jobs
this worker has taken, keyed by job id. Webhooks of every ending go out through `notify`
(webhooks.WebhookSender.send), RQ's own failure path included.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis

from contract.keys import JOB_FUNC, SERIALIZER
from contract.tracing import META_FIELD

from .jobs import RqJobs, Success, Unreadable, bound_job_class, enqueued_wait
from .surface import Execution, Job, JobStatus, Queue, WorkerStatus, now
from .worker_object import RqWorker

log = logging.getLogger("ddpm.worker")

# (job id, status: finished | failed | canceled, webhook URLs, enqueued_at, ended_at, error)
Notify = Callable[..., None]


@dataclass(frozen=True)
class Unstartable:
    """A taken job that cannot even be marked started (its hash does not load)."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Admitted:
    """A job marked started. `spec`: the keyword arguments of its JOB_FUNC call (the
    request), or None with `error` saying why its payload cannot run."""

    job_id: str
    queue_wait: float
    spec: dict[str, Any] | None
    error: str | None = None
    trace: dict[str, str] | None = None     # the W3C context the API stored (tracing.py)
    # Started before, somewhere (its hash named a worker when taken: RQ's `worker_name`,
    # which only a start writes and nothing clears): only such a job can have a resume
    # state or a checkpoint to read.
    ran_before: bool = False


@dataclass
class _Run:
    job: Job
    queue: Queue
    execution: Execution | None = None
    meta_unsaved: bool = False      # `meta` changed since it was last written


def hook_urls(job: Job, status: str) -> list[str]:
    """The webhook URLs stored on the job for `status` (any of them for canceled, which RQ
    has no webhooks for), each once."""
    seen: list[str] = []
    for hook in job.webhooks:
        if (status == "canceled" or hook.job_status == status) and hook.url not in seen:
            seen.append(hook.url)
    return seen


class RqSide:
    """RQ's bookkeeping for one batching worker (see the module docstring)."""

    def __init__(self, connection: Redis, queues: list[str], *, name: str | None,
                 worker_ttl: int, maintenance_interval: int, heartbeat_interval: float,
                 execution_ttl: int, result_ttl: int, notify: Notify | None,
                 on_stop_job: Callable[[str], None]) -> None:
        if not queues:
            raise ValueError("no queues to serve")
        self._notify = notify
        self._on_stop_job = on_stop_job
        self._runs: dict[str, _Run] = {}
        # The runs vs. the heartbeat and command threads: an execution must not be renewed
        # (and so recreated) after its job has ended.
        self._lock = threading.Lock()
        self._idle = False
        self._looked = 0.0          # when the queues were last looked at (take)
        self._checked = 0.0         # ... and when the wake lists were
        self._full = False          # the last take got all it wanted: more may wait
        self.worker = RqWorker(
            queues, name=name, connection=connection, serializer=SERIALIZER,
            job_class=bound_job_class(self._rq_webhook if notify else None),
            worker_ttl=worker_ttl, maintenance_interval=maintenance_interval,
            heartbeat_interval=heartbeat_interval, result_ttl=result_ttl,
            execution_ttl=execution_ttl, on_stop_job=self._stop_job,
            on_stop_execution=self._stop_execution)
        self.jobs = RqJobs(self.worker)
        self.redis = connection

    @property
    def name(self) -> str:
        return self.worker.name

    # -- the worker's life ------------------------------------------------------------

    def register(self, logging_level: str) -> None:
        """Register with RQ (`rq info` shows this worker) and listen for `rq` commands."""
        self.worker.bootstrap(logging_level)

    def close(self) -> None:
        """Register this worker's death and stop listening."""
        self.worker.teardown()

    def note_stop_requested(self) -> None:
        self.worker.note_stop_requested()

    def set_busy(self) -> None:
        self._idle = False      # `start` writes the busy state with the jobs

    def set_idle(self) -> None:
        """RQ's `idle` state, written once per change (not every idle pass)."""
        if not self._idle:
            self.worker.set_state(WorkerStatus.IDLE)
            self._idle = True

    def queues_have_jobs(self) -> bool:
        return any(q.count for q in self.worker.queues)

    def maintenance_due(self) -> bool:
        return bool(self.worker.should_run_maintenance_tasks)

    def run_maintenance(self) -> None:
        self.worker.run_maintenance_tasks()

    def postpone_maintenance(self) -> None:
        self.worker.postpone_maintenance()

    def clean_registries(self) -> None:
        """RQ's registry pass now (abandoned jobs back to their queues)."""
        self.worker.clean_registries()

    def heartbeat(self) -> None:
        """Renew this worker and every live execution (the heartbeat thread)."""
        with self._lock:
            self.jobs.heartbeat([(r.job, r.execution) for r in self._runs.values()
                                 if r.execution is not None])

    # -- taking and starting -----------------------------------------------------------

    def take(self, want: int, wake_keys: tuple[str, ...] = (), poll: float = 0.0,
             check: float = 0.0) -> tuple[list[str], list[Unstartable]]:
        """Up to `want` job ids in priority order (RqJobs.take); the jobs whose hash cannot
        be loaded come apart, to be failed with `fail_unreadable`.

        With `wake_keys`, the queues are looked at only when work may wait there: a wake
        token came (our enqueues push one), the last take was full, or `poll` seconds have
        passed since the queues were last looked at (jobs enqueued by plain RQ push none);
        a busy worker's pass otherwise costs one command, not an LMOVE per queue, and none
        at all within `check` seconds of its last look at the wake lists: a token waits
        that long at most, and Redis serves a round-trip per `check`, not one per pass."""
        t = time.monotonic()
        look = not wake_keys or self._full or t - self._looked >= poll
        if not look and t - self._checked < check:
            return [], []
        self._checked = t
        taken, bad = self.jobs.take(self.worker.queues, want, wake_keys, look)
        if look:
            self._looked = t
        self._full = len(taken) + len(bad) >= want
        with self._lock:
            for job, queue in taken:
                self._runs[job.id] = _Run(job, queue)
            for b in bad:
                self._runs[b.job_id] = _Run(Job(b.job_id, connection=self.redis), b.queue)
        return [job.id for job, _ in taken], [Unstartable(b.job_id, str(b)) for b in bad]

    def start(self, job_ids: list[str]) -> tuple[list[Admitted], list[str]]:
        """Mark taken jobs started (RqJobs.start), in one round-trip; the ids canceled or
        deleted since their take come back apart (call `canceled` for each). RedisError:
        nothing started; `put_back` them."""
        runs = [self._runs[j] for j in job_ids]
        before = {r.job.id for r in runs if r.job.worker_name}     # as taken: start sets it
        started, canceled = self.jobs.start([(r.job, r.queue) for r in runs])
        out = []
        with self._lock:
            for s in started:
                self._runs[s.job.id].execution = s.execution
        self._idle = False
        for s in started:
            out.append(Admitted(s.job.id, enqueued_wait(s.job, s.job.started_at),
                                *_payload(s.job), trace=_carrier(s.job),
                                ran_before=s.job.id in before))
        return out, [j.id for j in canceled]

    def put_back(self, job_id: str) -> None:
        """A job taken as Redis went away, not started: back to its queue's front."""
        run = self._runs[job_id]
        self.jobs.put_back(run.job, run.queue)
        self._forget(job_id)

    def fail_unreadable(self, bad: Unstartable) -> None:
        run = self._forget(bad.job_id)
        if run is not None:
            self.jobs.fail_unreadable(Unreadable(bad.job_id, run.queue, ValueError(bad.reason)),
                                      self.worker.result_ttl)

    # -- ending ----------------------------------------------------------------------------

    def succeed(self, results: dict[str, dict[str, Any]]) -> None:
        """RQ success for every job of `results` (job id → its return value), in one
        round-trip; then their `finished` webhooks. RedisError: nothing recorded."""
        if not results:
            return
        runs = {j: self._runs[j] for j in results}
        with self._lock:
            batched = self.jobs.succeed([
                Success(r.job, r.queue, r.execution, results[j],  # type: ignore[arg-type]
                        r.job._serialize_meta() if r.meta_unsaved else None)
                for j, r in runs.items()])
            for j in results:
                self._runs.pop(j, None)
        for job in batched:         # RQ's own path (the rest) sent theirs through BatchJob
            self._send(job, "finished", None)

    def fail(self, job_id: str, message: str, *, retry: bool, stopped: bool = False) -> str:
        """RQ's failure path (`handle_job_failure`): failed registry and result, or, with
        `retry` and retries left, RQ's Retry re-queues it; `stopped`: RQ's stop command
        (status stopped, never retried). Returns the outcome: failed, requeued or stopped."""
        run = self._runs[job_id]
        job, w = run.job, self.worker
        if not retry:
            job.retries_left = 0
        job.ended_at = now()
        if stopped:
            w._stopped_job_id = job.id        # what RQ's failure path reads for "stopped"
        requeued = not stopped and job.should_retry
        with self._lock:
            self._runs.pop(job_id, None)
            # Sends the failed webhooks (not retried, not stopped) through BatchJob.
            w.handle_job_failure(job, run.queue, exc_string=message, execution=run.execution)
        if stopped:
            self._send(job, "canceled", message)
        return "stopped" if stopped else "requeued" if requeued else "failed"

    def canceled(self, job_id: str, reason: str) -> None:
        """A job canceled (or deleted) through RQ, which has already recorded it: end its
        execution, if any, and send its canceled webhooks."""
        run = self._release(job_id)
        if run is not None:
            self._send(run.job, "canceled", reason)

    def requeue(self, job_id: str) -> None:
        """Back to its queue's front (shutdown past the grace period)."""
        run = self._release(job_id)
        if run is not None:
            run.job.started_at = None
            run.queue.enqueue_job(run.job, at_front=True)

    def requeue_many(self, job_ids: list[str], values: dict[str, bytes], ttl: int) -> None:
        """A drain's one round-trip: store `values` (key → bytes, expiring in `ttl` s: the
        jobs' resume states), end the jobs' executions and put them back at their queues'
        front, in their order. Raises RedisError with nothing recorded here."""
        with self._lock:
            runs = [(j, self._runs[j]) for j in job_ids if j in self._runs]
            with self.redis.pipeline() as p:
                p.multi()           # RQ's enqueue_job wants one, made before any command
                for key, value in values.items():
                    p.set(key, value, ex=ttl)
                for _, run in reversed(runs):   # each goes in front of the one after it
                    if run.execution is not None:
                        self.worker.cleanup_execution(run.job, p, run.execution)
                    run.job.started_at = None
                    run.queue.enqueue_job(run.job, pipeline=p, at_front=True)
                p.execute()
            for job_id, _ in runs:
                self._runs.pop(job_id, None)

    def release(self, job_id: str) -> None:
        """End a job's execution without recording an outcome."""
        self._release(job_id)

    def ended_elsewhere(self, job_ids: list[str]) -> dict[str, str]:
        """The jobs canceled or deleted through RQ since they started: id → why."""
        if not job_ids:
            return {}
        statuses = self.jobs.statuses([self._runs[j].job for j in job_ids])
        out = {}
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status is None:
                out[job_id] = "job was deleted"
            elif status.decode() == JobStatus.CANCELED:
                out[job_id] = "canceled"
        return out

    def meta_update(self, job_id: str, **fields: Any) -> tuple[str, bytes]:
        """Update the job's RQ `meta` with `fields`: (its hash key, the `meta` field's new
        value), for the caller to write in order with its events (RQ's save_meta)."""
        run = self._runs[job_id]
        run.job.meta.update(fields)
        run.meta_unsaved = False
        return run.job.key, run.job._serialize_meta()

    def meta_at_success(self, job_id: str, **fields: Any) -> None:
        """Update the job's RQ `meta` with `fields`, to be written by its success (in the
        same HSET as its status): a job's last progress, which no reader needs before the
        job ends, costs no write of its own. Raises as `meta_update` where RQ could not read
        the stored meta."""
        run = self._runs[job_id]
        run.job.meta.update(fields)
        run.job._serialize_meta()       # fails now, not at success, if it cannot be written
        run.meta_unsaved = True

    # -- inside ------------------------------------------------------------------------

    def _release(self, job_id: str) -> _Run | None:
        """End a job's execution without recording an outcome."""
        with self._lock:
            run = self._runs.pop(job_id, None)
            if run is not None and run.execution is not None:
                self.jobs.release(run.job, run.execution)
        return run

    def _forget(self, job_id: str) -> _Run | None:
        with self._lock:
            return self._runs.pop(job_id, None)

    def _send(self, job: Job, status: str, error: str | None) -> None:
        if self._notify is None:
            return
        urls = hook_urls(job, status)
        if urls:
            self._notify(job.id, status, urls, enqueued_at=job.enqueued_at,
                         ended_at=job.ended_at or now(), error=error)

    def _rq_webhook(self, job: Job, status: str, error: str | None) -> None:
        """RQ's own calls (its failure path; jobs abandoned past their retries)."""
        self._send(job, status, error)

    def _stop_job(self, job_id: str) -> bool:
        with self._lock:
            known = job_id in self._runs and self._runs[job_id].execution is not None
        if known:
            self._on_stop_job(job_id)
        return known

    def _stop_execution(self, execution_id: str) -> bool:
        with self._lock:
            job_id = next((j for j, r in self._runs.items()
                           if r.execution is not None and r.execution.id == execution_id),
                          None)
        return job_id is not None and self._stop_job(job_id)


def _carrier(job: Job) -> dict[str, str] | None:
    """The trace context stored in the job's meta by the API, if any."""
    carrier = job.meta.get(META_FIELD) if isinstance(job.meta, dict) else None
    return {str(k): str(v) for k, v in carrier.items()} if isinstance(carrier, dict) else None


def _payload(job: Job) -> tuple[dict[str, Any] | None, str | None]:
    """The job's JOB_FUNC keyword arguments, or why there are none."""
    try:
        func, args, kwargs = job.func_name, job.args, job.kwargs
    except Exception as e:   # undecodable payload (RQ's DeserializationError says nothing)
        cause = e.__cause__ or e
        return None, f"job payload cannot be decoded: {type(cause).__name__}: {cause}"
    if func != JOB_FUNC or args:
        return None, f"not a generation job: expected {JOB_FUNC}(**spec), got {func}"
    # Anything but a mapping is left for the spec's validation to name (not dict()'s error).
    return (dict(kwargs) if isinstance(kwargs, dict) else kwargs), None

