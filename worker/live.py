"""The jobs a worker is running, and how each of them ends.

`LiveJobs` is the one list of this worker's running jobs. Each way a job can end
(succeeded, failed, stopped, canceled, re-queued) lives here once: its RQ outcome, its
event, its metric and its log line, so the loop only decides *that* a job ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.utils import now

from contract.events import Event, EventType, JobResult
from contract.keys import JOB_FUNC, image_key
from contract.preview import Preview
from contract.spec import GenerationSpec

from .engine import Engine
from .events import Batch, EventWriter
from .metrics import WorkerMetrics
from .rq_jobs import BatchJob, RqJobs, Success
from .webhooks import WebhookSender

log = logging.getLogger("ddpm.worker")


class JobError(Exception):
    """A job that cannot run as submitted; it fails with this message, never retried."""


def parse_spec(job: Job) -> GenerationSpec:
    """The job's request spec, or JobError saying what is wrong with the payload."""
    try:
        func, args, kwargs = job.func_name, job.args, job.kwargs
    except Exception as e:   # undecodable payload (RQ's DeserializationError says nothing)
        cause = e.__cause__ or e
        raise JobError(f"job payload cannot be decoded: {type(cause).__name__}: {cause}") \
            from None
    if func != JOB_FUNC or args:
        raise JobError(f"not a generation job: expected {JOB_FUNC}(**spec), got {func}")
    try:
        return GenerationSpec.model_validate(kwargs)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'spec'}: {x['msg']}"
                         for x in e.errors())
        raise JobError(f"invalid generation spec: {errs}") from None


@dataclass
class LiveJob:
    """A job this worker has started."""

    job: Job
    queue: Queue
    execution: Execution
    spec: GenerationSpec | None = None      # None until its payload is read
    preview: Preview | None = None          # its snapshot frames, once its model is known
    started: float = field(default_factory=time.monotonic)
    queue_wait: float = 0.0
    last_seq: int = 0             # the last writer batch that carries this job's writes
    complete: bool = False        # every image computed; waiting for its writes
    last_progress: float = 0.0

    @property
    def id(self) -> str:
        return self.job.id


class LiveJobs:
    """This worker's running jobs and their endings."""

    def __init__(self, rq: RqJobs, engine: Engine, writer: EventWriter,
                 metrics: WorkerMetrics) -> None:
        self.rq = rq
        self.engine = engine
        self.writer = writer
        self.metrics = metrics
        self._jobs: dict[str, LiveJob] = {}
        # The job list and RQ's executions vs. the heartbeat thread: an execution must not
        # be renewed (and so recreated) after its job has ended.
        self.lock = threading.Lock()
        # Completion webhooks (URLs stored on the RQ job) go out from their own threads: a
        # slow or dead endpoint must never hold up the step loop or a job's event stream.
        # RQ's own calls (its failure path, abandoned jobs found by maintenance) come here
        # too, through BatchJob.send_webhooks.
        self.webhooks = WebhookSender(rq.worker.settings, metrics)
        BatchJob.webhook_sender = self.webhooks

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[LiveJob]:
        return iter(list(self._jobs.values()))

    def get(self, job_id: str) -> LiveJob | None:
        return self._jobs.get(job_id)

    def add(self, run: LiveJob) -> None:
        with self.lock:
            self._jobs[run.id] = run

    def executions(self) -> list[tuple[Job, Execution]]:
        """What the heartbeat renews (call with `lock` held)."""
        return [(r.job, r.execution) for r in self._jobs.values()]

    def close(self) -> None:
        self.webhooks.close()

    # -- endings -----------------------------------------------------------------------

    def succeed(self, runs: list[LiveJob]) -> None:
        """Every image of `runs` is stored: RQ success for all of them at once, then `done`.
        Raises RedisError with the jobs still live: the next pass tries again."""
        if not runs:
            return
        results = {r.id: self._result(r).to_dict() for r in runs}
        with self.lock:
            self.rq.succeed([Success(r.job, r.queue, r.execution, results[r.id])
                             for r in runs])
            for r in runs:
                self._jobs.pop(r.id, None)
        batch = Batch()
        for r in runs:
            batch.event(r.id, Event(EventType.DONE, results[r.id]))
            elapsed = time.monotonic() - r.started
            self.metrics.jobs.labels("succeeded").inc()
            self.metrics.duration.labels("succeeded").observe(elapsed)
            self.webhooks.send(r.job, "finished")
            log.debug("job %s succeeded in %.3fs", r.id, elapsed)
        self.writer.send(batch)

    @staticmethod
    def _result(run: LiveJob) -> JobResult:
        spec = run.spec
        assert spec is not None
        return JobResult(model=spec.model, num_images=spec.num_images, seed=spec.seed,
                         sampler=spec.sampler, steps=spec.steps,
                         image_keys=[image_key(run.id, i) for i in range(spec.num_images)],
                         queue_wait_s=round(run.queue_wait, 4),
                         run_s=round(time.monotonic() - run.started, 4))

    def fail(self, run: LiveJob, message: str, *, retry: bool, stopped: bool = False,
             batch: Batch | None = None) -> None:
        """Fail a job (RQ failed registry, error event); `retry` lets RQ's Retry re-queue it;
        `stopped`: RQ's stop command (status stopped, never retried). `batch`: the loop
        pass's writes not sent yet, which may hold this job's earlier events: its last
        event goes after them."""
        job, w = run.job, self.rq.worker
        self.engine.cancel(job.id)
        self.writer.forget(job.id)
        if not retry:
            job.retries_left = 0
        job.ended_at = now()
        if stopped:
            w._stopped_job_id = job.id
        requeued = not stopped and job.should_retry
        with self.lock:
            self._jobs.pop(job.id, None)
            # Sends the failed webhooks (not retried, not stopped) through BatchJob.
            w.handle_job_failure(job, run.queue, exc_string=message, execution=run.execution)
        if stopped:
            self.webhooks.send(job, "canceled", error=message)
        outcome = "stopped" if stopped else "requeued" if requeued else "failed"
        log.warning("job %s %s: %s", job.id, outcome, message)
        kind = (EventType.CANCELED if stopped else EventType.REQUEUED if requeued
                else EventType.ERROR)
        if batch is not None:
            batch.event(job.id, Event(kind, {"message": message}))
        else:
            self.writer.event(job.id, Event(kind, {"message": message}))
        self.metrics.jobs.labels(outcome).inc()
        self.metrics.duration.labels(outcome).observe(time.monotonic() - run.started)

    def cancel(self, run: LiveJob, reason: str) -> None:
        """A job canceled (or deleted) through RQ, which has already recorded it: free its
        slots and end its execution."""
        self._release(run)
        self.canceled_before_start(run.job, reason)

    def canceled_before_start(self, job: Job, reason: str = "canceled") -> None:
        self.writer.event(job.id, Event(EventType.CANCELED, {"message": reason}))
        self.webhooks.send(job, "canceled", error=reason)
        self.metrics.jobs.labels("canceled").inc()
        log.info("job %s canceled", job.id)

    def requeue_all(self) -> None:
        """Shutdown past the grace period: every running job goes back to its queue's front."""
        for run in self:
            self._release(run)
            run.job.started_at = None
            run.queue.enqueue_job(run.job, at_front=True)
            self.writer.event(run.id, Event(EventType.REQUEUED, {"worker": self.rq.worker.name}))
            log.info("job %s re-queued", run.id)

    def _release(self, run: LiveJob) -> None:
        """Free a job's slots and end its RQ execution without recording an outcome."""
        self.engine.cancel(run.id)
        self.writer.forget(run.id)
        with self.lock:
            self._jobs.pop(run.id, None)
            self.rq.release(run.job, run.execution)
