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
from typing import Any

from pydantic import ValidationError

from contract import tracing
from contract.events import Canceled, Done, Error, JobResult, Requeued, TypedEvent
from contract.keys import cost_key, image_key, input_key, resume_key
from contract.results_store import input_object
from contract.spec import GenerationSpec

from .engine import Engine
from .events import Batch, EventWriter
from .metrics import WorkerMetrics
from .rqside import RqSide

log = logging.getLogger("ddpm.worker")


class JobError(Exception):
    """A job that cannot run as submitted; it fails with this message, never retried."""


def parse_spec(spec: dict[str, Any] | None, error: str | None = None) -> GenerationSpec:
    """The job's request spec (its JOB_FUNC keyword arguments), or JobError saying what is
    wrong with the payload (`error`: why the RQ side found none)."""
    if spec is None:
        raise JobError(error or "job has no generation spec")
    try:
        return GenerationSpec.model_validate(spec)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'spec'}: {x['msg']}"
                         for x in e.errors())
        raise JobError(f"invalid generation spec: {errs}") from None


@dataclass
class LiveJob:
    """A job this worker has started."""

    id: str
    spec: GenerationSpec | None = None      # None until its payload is read
    started: float = field(default_factory=time.monotonic)
    queue_wait: float = 0.0
    last_seq: int = 0             # the last writer batch that carries this job's writes
    complete: bool = False        # every image computed; waiting for its writes
    # The progress throttle starts at `started`: a first step's progress would reach the
    # stream in the same write as `started` (no reader can tell the two moments apart), so
    # a job shorter than the interval sends only its last progress (a 1-image job: 4
    # events, not 5).
    last_progress: float = field(default_factory=time.monotonic)
    # A resume state of the job's may be stored (it came with one, or a checkpoint was
    # written here): deleted when the job succeeds.
    saved: bool = False
    span: tracing.Span | None = None    # its `job` span, when tracing is on (tracing.py)
    # The events of its last step (its last images' `image`, its last `progress`), written
    # with its `done`: a reader following the stream then wakes once for the three, not
    # twice, and none can tell (the images are stored before any of them is written, and
    # the job is `started` until `done`). Dropped if it ends otherwise.
    held: list[TypedEvent] = field(default_factory=list)

    @property
    def traced(self) -> str:
        """What its log lines add: ` trace_id=…` when traced, else nothing."""
        tid = tracing.trace_id(self.span)
        return f" trace_id={tid}" if tid else ""


class LiveJobs:
    """This worker's running jobs and their endings."""

    def __init__(self, rq: RqSide, engine: Engine, writer: EventWriter,
                 metrics: WorkerMetrics) -> None:
        self.rq = rq
        self.engine = engine
        self.writer = writer
        self.metrics = metrics
        self._jobs: dict[str, LiveJob] = {}
        self.lock = threading.Lock()      # the job list vs. other threads' lookups

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[LiveJob]:
        return iter(list(self._jobs.values()))

    def send(self, batch: Batch) -> None:
        """Hand a pass's writes to the writer; each job in it remembers the batch, so it is
        reported done only once they are in Redis."""
        seq = self.writer.send(batch)
        for job_id in batch.jobs:
            run = self._jobs.get(job_id)
            if run is not None:
                run.last_seq = seq

    def get(self, job_id: str) -> LiveJob | None:
        return self._jobs.get(job_id)

    def add(self, run: LiveJob) -> None:
        with self.lock:
            self._jobs[run.id] = run

    # -- endings -----------------------------------------------------------------------

    def succeed(self, runs: list[LiveJob]) -> None:
        """Every image of `runs` is stored: RQ success for all of them at once, then `done`.
        Raises RedisError with the jobs still live: the next pass tries again."""
        if not runs:
            return
        results = {r.id: self._job_result(r) for r in runs}
        self.rq.succeed({job_id: result.to_dict() for job_id, result in results.items()})
        with self.lock:
            for r in runs:
                self._jobs.pop(r.id, None)
        batch = Batch()
        for r in runs:
            for event in r.held:
                batch.event(r.id, event)
            batch.event(r.id, Done.of(results[r.id]))
            batch.value(r.id, cost_key(r.id), None, 0)       # no longer work (contract/work.py)
            if r.saved:
                batch.value(r.id, resume_key(r.id), None, 0)
            self._inputs_stored(r, batch)
            elapsed = time.monotonic() - r.started
            self.metrics.jobs.labels("succeeded").inc()
            self.metrics.duration.labels("succeeded").observe(elapsed,
                                                              tracing.exemplar(r.span))
            log.debug("job %s succeeded in %.3fs%s", r.id, elapsed, r.traced)
            tracing.end_job(r.span, "succeeded")
        self.writer.send(batch)

    def _inputs_stored(self, run: LiveJob, batch: Batch) -> None:
        """With a result store, the job's inputs are there now (uploaded at its start, in
        writes that landed before it could succeed): their keys keep only the objects'
        URLs. (Until the job succeeds they keep the PNGs, so a re-queued run reads them
        from Redis like any other.)"""
        store = self.writer.store
        if store is None or run.spec is None:
            return
        for name in run.spec.inputs:
            batch.value(run.id, input_key(run.id, name),
                        store.pointer(input_object(run.id, name)), self.writer.limits.ttl)

    @staticmethod
    def _job_result(run: LiveJob) -> JobResult:
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
        self.engine.cancel(run.id)
        self.writer.forget(run.id)
        with self.lock:
            self._jobs.pop(run.id, None)
        outcome = self.rq.fail(run.id, message, retry=retry, stopped=stopped)
        requeued = outcome == "requeued"
        log.warning("job %s %s: %s%s", run.id, outcome, message, run.traced)
        kind = Canceled if stopped else Requeued if requeued else Error
        end = batch if batch is not None else Batch()
        end.event(run.id, kind(message=message))
        if not requeued:                # its cost is no longer work (contract/work.py)
            end.value(run.id, cost_key(run.id), None, 0)
        if batch is None:
            self.writer.send(end)
        self.metrics.jobs.labels(outcome).inc()
        self.metrics.duration.labels(outcome).observe(time.monotonic() - run.started,
                                                      tracing.exemplar(run.span))
        tracing.end_job(run.span, outcome, message)

    def cancel(self, run: LiveJob, reason: str) -> None:
        """A job canceled (or deleted) through RQ, which has already recorded it: free its
        slots and end its execution."""
        self._free(run)
        self.canceled_before_start(run.id, reason)
        tracing.end_job(run.span, "canceled")

    def canceled_before_start(self, job_id: str, reason: str = "canceled") -> None:
        self.rq.canceled(job_id, reason)
        end = Batch()
        end.event(job_id, Canceled(message=reason))
        end.value(job_id, cost_key(job_id), None, 0)    # no longer work (contract/work.py)
        self.writer.send(end)
        self.metrics.jobs.labels("canceled").inc()
        log.info("job %s canceled", job_id)

    def requeue_all(self) -> None:
        """Shutdown past the grace period: every running job goes back to its queue's front."""
        for run in self:
            self._free(run)
            self.rq.requeue(run.id)
            self.writer.event(run.id, Requeued(worker=self.rq.name))
            log.info("job %s re-queued%s", run.id, run.traced)
            tracing.end_job(run.span, "requeued")

    def forget(self, run: LiveJob) -> None:
        """A job that left this worker another way (a drain re-queued it)."""
        self._free(run)
        tracing.end_job(run.span, "requeued")

    def _free(self, run: LiveJob) -> None:
        """Free a job's slots and forget it here (the RQ side ends its execution)."""
        self.engine.cancel(run.id)
        self.writer.forget(run.id)
        with self.lock:
            self._jobs.pop(run.id, None)
