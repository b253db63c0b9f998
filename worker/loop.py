"""The RQ worker that runs many jobs at once through the continuous-batching engine.

RQ stays the source of truth for job state. Each admitted job gets its own RQ execution
(RQ ≥ 3 tracks several per worker), so queues, the started/finished/failed/canceled
registries, results, `rq info` and rq-dashboard stay right while dozens of jobs share one
batch. The loop is DESIGN.md §5:

    admit   non-blocking dequeues while the engine has room (block ≤ 1 s only when idle)
    step    one engine step: a UNet forward per model over every active slot
    emit    frames → PNG → Redis (background thread); progress events, throttled
    retire  jobs whose images are all stored → RQ success; canceled jobs → slots freed

A side thread sends the heartbeats of every live execution, so a slow step never makes a
live job look abandoned; if this process dies, its executions expire and a live worker's
maintenance pass re-queues the jobs (RQ `Retry`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import now
from rq.worker.base import BaseWorker, WorkerStatus

from .catalog import Catalog
from .contract import (
    JOB_FUNC,
    PRIORITIES,
    SERIALIZER,
    Event,
    EventType,
    GenerationSpec,
    JobResult,
    image_key,
    queue_name,
    worker_key,
)
from .engine import Engine, StepReport
from .events import EventWriter
from .metrics import WorkerMetrics
from .settings import WorkerSettings

log = logging.getLogger("ddpm.worker")

CONTROL_INTERVAL = 0.25     # seconds between checks for canceled jobs


class JobError(Exception):
    """A job that cannot run as submitted; it fails with this message, never retried."""


@dataclass
class Running:
    """A job this worker has started: its RQ objects and bookkeeping."""

    job: Job
    queue: Queue
    execution: Execution
    spec: GenerationSpec | None = None
    started: float = field(default_factory=time.monotonic)
    queue_wait: float = 0.0
    writes: list[Future[Any]] = field(default_factory=list)
    complete: bool = False            # every image computed; waiting for writes
    last_progress: float = 0.0


def parse_spec(job: Job) -> GenerationSpec:
    """The job's request spec, or JobError saying what is wrong with the payload."""
    try:
        func, args, kwargs = job.func_name, job.args, job.kwargs
    except Exception as e:   # undecodable payload
        raise JobError(f"job payload cannot be decoded: {e}") from None
    if func != JOB_FUNC or args:
        raise JobError(f"not a generation job: expected {JOB_FUNC}(**spec), got {func}")
    try:
        return GenerationSpec.model_validate(kwargs)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'spec'}: {x['msg']}"
                         for x in e.errors())
        raise JobError(f"invalid generation spec: {errs}") from None


class BatchWorker(BaseWorker):
    """An RQ worker whose jobs are slots of one continuously batched diffusion loop."""

    def __init__(self, settings: WorkerSettings, connection: Redis, catalog: Catalog,
                 engine: Engine, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.engine = engine
        self.metrics = metrics or WorkerMetrics()
        queues = [queue_name(m, p) for p in PRIORITIES for m in catalog.names]
        if not queues:
            raise ValueError("no models to serve")
        super().__init__(queues, name=settings.name, connection=connection,
                         serializer=SERIALIZER, worker_ttl=settings.worker_ttl,
                         maintenance_interval=settings.maintenance_interval,
                         job_monitoring_interval=int(settings.heartbeat_interval),
                         default_result_ttl=settings.result_ttl)
        self.writer = EventWriter(connection, ttl=settings.result_ttl,
                                  maxlen=settings.stream_maxlen)
        # Completion webhooks (RQ's, stored on the job) go out from their own threads: a slow
        # or dead endpoint must never hold up the step loop or a job's event stream.
        self._webhooks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ddpm-webhook")
        self.live: dict[str, Running] = {}
        self._lock = threading.Lock()          # live/executions vs. the heartbeat thread
        self._stop_exec: set[str] = set()       # execution ids `rq` asked to stop
        self._beat_stop = threading.Event()
        self._drain_deadline: float | None = None
        self._last_control = 0.0
        for name, m in catalog.loaded.items():
            self.metrics.model_load.labels(name).set(m.load_seconds)

    # -- RQ hooks --------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Executions expire `execution_ttl` after the last beat, whatever the job timeout:
        the side thread beats all of them, and a dead worker's jobs come back quickly.
        """
        return self.settings.execution_ttl

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)

    def request_stop(self, signum: Any, frame: Any) -> None:
        """First signal: stop admitting and drain within the grace period. Second: re-queue
        what is running now. Never raises inside the step (unlike RQ's default).
        """
        if self._stop_requested:
            log.warning("second stop signal: re-queueing running jobs now")
            self._drain_deadline = time.monotonic()
            return
        log.info("stop requested: no new jobs; %d running get %.0fs to finish",
                 len(self.live), self.settings.grace_period)
        self._stop_requested = True
        self._shutdown_requested_date = now()
        self._drain_deadline = time.monotonic() + self.settings.grace_period

    def request_stop_execution(self, execution_id: str) -> None:
        """`rq` stop-job command (pubsub thread): the loop stops that job at its next step."""
        with self._lock:
            self._stop_exec.add(execution_id)

    # -- the loop --------------------------------------------------------------------

    def work(self, burst: bool = False, logging_level: str | None = None,  # type: ignore[override]
             **_: Any) -> bool:
        """Run until stopped (or, with `burst`, until the queues are empty and all is done)."""
        self.bootstrap(logging_level or self.settings.log_level)
        self._install_signal_handlers()
        self.advertise()
        beats = threading.Thread(target=self._heartbeat_loop, name="ddpm-heartbeat", daemon=True)
        beats.start()
        worked = False
        try:
            while True:
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                self._control()
                if not self._stop_requested:
                    busy = bool(self.engine.jobs) or bool(self.live)
                    if self._admit(block=not busy and not burst):
                        worked = True
                if self.engine.jobs:
                    self._emit(self.engine.step())
                self._retire()
                if not self.live:
                    if self._stop_requested:
                        break
                    if burst and not self._queues_have_jobs():
                        break
                    self.set_state(WorkerStatus.IDLE)
                elif self._stop_requested and self._drain_deadline is not None \
                        and time.monotonic() >= self._drain_deadline:
                    self._requeue_all()
                    break
                elif not self.engine.jobs:
                    time.sleep(0.005)    # only writes outstanding: let the writer thread run
        finally:
            self._beat_stop.set()
            beats.join(timeout=5)
            self.writer.close()
            self._webhooks.shutdown(wait=True)
            self._unadvertise()
            self.teardown()
        return worked

    def _queues_have_jobs(self) -> bool:
        return any(q.count for q in self.queues)

    # -- admit -----------------------------------------------------------------------

    def _admit(self, *, block: bool) -> bool:
        """Take jobs while the engine has room; wait up to 1 s for the first when idle."""
        took = False
        while self.engine.has_room() and not self._stop_requested:
            try:
                result = self.queue_class.dequeue_any(
                    self._ordered_queues, 1 if block and not took else None,
                    connection=self.connection, job_class=self.job_class,
                    serializer=self.serializer)
            except DequeueTimeout:
                return took
            except RedisError as e:
                log.error("dequeue failed: %s; retrying", e)
                time.sleep(1)
                return took
            if result is None:
                return took
            job, queue = result
            self._start(job, queue)
            took = True
        return took

    def _start(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        job.started_at = now()
        run = Running(job=job, queue=queue, execution=execution)
        if job.enqueued_at:
            run.queue_wait = max(0.0, (job.started_at - job.enqueued_at).total_seconds())
            self.metrics.queue_wait.observe(run.queue_wait)
        with self._lock:
            self.live[job.id] = run
        try:
            run.spec = parse_spec(job)
            if run.spec.model in self.catalog.broken:
                raise JobError(self.catalog.broken[run.spec.model])
            self.engine.admit(job.id, run.spec)
        except (JobError, ValueError) as e:
            self._fail(run, str(e), retry=False)
            return
        run.writes.append(self.writer.event(job.id, Event(EventType.STARTED, {
            "worker": self.name, "model": run.spec.model, "num_images": run.spec.num_images,
            "steps": run.spec.steps, "queue_wait_s": round(run.queue_wait, 3)})))
        log.info("job %s started: %s ×%d, %s %d steps", job.id, run.spec.model,
                 run.spec.num_images, run.spec.sampler, run.spec.steps)

    # -- emit ------------------------------------------------------------------------

    def _emit(self, report: StepReport) -> None:
        m = self.metrics
        slots = sum(report.slots.values())
        m.active.set(slots)
        m.waiting.set(self.engine.waiting)
        m.occupancy.observe(slots / self.engine.max_batch)
        for model, n in report.slots.items():
            m.steps.labels(model).inc(n)
            m.forward.labels(model).observe(report.forward_seconds[model])
        for frame in report.frames:
            run = self.live.get(frame.job_id)
            if run is None or run.spec is None:
                continue
            run.writes.append(self.writer.frame(frame, run.spec.steps, run.spec.snapshot_kind))
            if frame.final:
                m.images.labels(run.spec.model).inc()
        t = time.monotonic()
        completed = set(report.completed)
        for job_id in report.progressed:
            run = self.live.get(job_id)
            if run is None or run.spec is None:
                continue
            if job_id in completed:
                run.complete = True
                spec = run.spec
                self._progress(run, spec.total_steps, spec.num_images,
                               [spec.steps] * spec.num_images)
            elif t - run.last_progress >= self.settings.progress_interval:
                run.last_progress = t
                ej = self.engine.jobs[job_id]
                self._progress(run, ej.steps_done, ej.finished, ej.image_steps())

    def _progress(self, run: Running, steps_done: int, images_done: int,
                  image_steps: list[int]) -> None:
        assert run.spec is not None
        total = run.spec.total_steps
        data = {"steps_done": steps_done, "total_steps": total, "images_done": images_done,
                "num_images": run.spec.num_images, "image_steps": image_steps}
        run.writes.append(self.writer.event(run.job.id, Event(EventType.PROGRESS, data)))
        run.job.meta.update(progress=round(steps_done / total, 4), steps_done=steps_done,
                            images_done=images_done, image_steps=image_steps)
        run.writes.append(self.writer.submit(run.job.save_meta))

    # -- retire ----------------------------------------------------------------------

    def _retire(self) -> None:
        for run in [r for r in self.live.values() if r.complete]:
            if not all(f.done() for f in run.writes):
                continue
            errors = [f.exception() for f in run.writes if f.exception() is not None]
            if errors:
                self._fail(run, f"storing results failed: {errors[0]}", retry=True)
            else:
                self._succeed(run)

    def _succeed(self, run: Running) -> None:
        assert run.spec is not None
        job, spec = run.job, run.spec
        elapsed = time.monotonic() - run.started
        result = JobResult(model=spec.model, num_images=spec.num_images, seed=spec.seed,
                           sampler=spec.sampler, steps=spec.steps,
                           image_keys=[image_key(job.id, i) for i in range(spec.num_images)],
                           queue_wait_s=round(run.queue_wait, 4), run_s=round(elapsed, 4))
        with self._lock:
            self.live.pop(job.id, None)
            self._finalize_success(job, run.queue, run.execution, result.to_dict())
        self.writer.event(job.id, Event(EventType.DONE, result.to_dict()))
        if job.webhooks:
            self._webhooks.submit(job.send_webhooks, JobStatus.FINISHED)
        self.metrics.jobs.labels("succeeded").inc()
        self.metrics.duration.labels("succeeded").observe(elapsed)

    def _fail(self, run: Running, message: str, *, retry: bool, stopped: bool = False) -> None:
        """Fail a job (RQ failed registry, error event); `retry` lets RQ's Retry re-queue it."""
        job = run.job
        self.engine.cancel(job.id)
        if not retry:
            job.retries_left = 0
        job.ended_at = now()
        if stopped:
            self._stopped_job_id = job.id
        requeued = not stopped and job.should_retry
        hooks, job.webhooks = job.webhooks, []     # RQ would send them here, on this thread
        with self._lock:
            self.live.pop(job.id, None)
            self.handle_job_failure(job, run.queue, exc_string=message, execution=run.execution)
        job.webhooks = hooks
        if hooks and not requeued and not stopped:
            self._webhooks.submit(job.send_webhooks, JobStatus.FAILED, exc_string=message)
        outcome = "stopped" if stopped else "requeued" if requeued else "failed"
        log.warning("job %s %s: %s", job.id, outcome, message)
        kind = (EventType.CANCELED if stopped else EventType.REQUEUED if requeued
                else EventType.ERROR)
        self.writer.event(job.id, Event(kind, {"message": message}))
        self.metrics.jobs.labels(outcome).inc()
        self.metrics.duration.labels(outcome).observe(time.monotonic() - run.started)

    def _release(self, run: Running) -> None:
        """Free a job's slots and end its RQ execution without recording an outcome."""
        self.engine.cancel(run.job.id)
        with self._lock:
            self.live.pop(run.job.id, None)
            with self.connection.pipeline() as p:
                self.cleanup_execution(run.job, p, run.execution)
                p.execute()

    def _drop(self, run: Running, reason: str) -> None:
        """A job canceled through RQ, which already has it in the canceled registry."""
        self._release(run)
        self.writer.event(run.job.id, Event(EventType.CANCELED, {"message": reason}))
        self.metrics.jobs.labels("canceled").inc()
        log.info("job %s canceled", run.job.id)

    def _requeue_all(self) -> None:
        """Shutdown past the grace period: put every running job back at the queue's front."""
        for run in list(self.live.values()):
            self._release(run)
            run.job.started_at = None
            run.queue.enqueue_job(run.job, at_front=True)
            self.writer.event(run.job.id, Event(EventType.REQUEUED, {"worker": self.name}))
            log.info("job %s re-queued", run.job.id)

    # -- control: cancellations and stop requests --------------------------------------

    def _control(self) -> None:
        t = time.monotonic()
        if not self.live or t - self._last_control < CONTROL_INTERVAL:
            return
        self._last_control = t
        runs = list(self.live.values())
        with self.connection.pipeline(transaction=False) as p:
            for run in runs:
                p.hget(run.job.key, "status")
            statuses = p.execute()
        with self._lock:
            stop, self._stop_exec = self._stop_exec, set()
        for run, status in zip(runs, statuses, strict=True):
            if run.job.id not in self.live:
                continue
            if status is None:
                self._drop(run, "job was deleted")
            elif status.decode() == JobStatus.CANCELED:
                self._drop(run, "canceled")
            elif run.execution.id in stop:
                self._fail(run, "stopped by request", retry=False, stopped=True)

    # -- liveness and advertisement ----------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._beat_stop.wait(self.settings.heartbeat_interval):
            try:
                with self._lock:
                    runs = list(self.live.values())
                    if not runs:
                        self.heartbeat()
                    for run in runs:
                        self.maintain_heartbeats(run.job, run.execution)
                self.advertise()
                if torch.cuda.is_available() and self.engine.device.type == "cuda":
                    self.metrics.gpu_memory.labels("allocated").set(
                        torch.cuda.memory_allocated(self.engine.device))
                    self.metrics.gpu_memory.labels("reserved").set(
                        torch.cuda.memory_reserved(self.engine.device))
            except RedisError as e:
                log.error("heartbeat failed: %s", e)
            except Exception:  # the side thread must outlive any one failure
                log.exception("heartbeat thread error")

    def advertise(self) -> None:
        """`ddpm:workers:{name}`: the models this worker serves, expiring unless renewed."""
        doc = {"name": self.name, "device": str(self.engine.device),
               "max_batch": self.engine.max_batch, "active_slots": self.engine.active,
               "models": [vars(m.info) for m in self.catalog.loaded.values()],
               "broken": self.catalog.broken, "draining": self._stop_requested}
        ttl = max(15, int(3 * self.settings.heartbeat_interval))
        self.connection.set(worker_key(self.name), json.dumps(doc), ex=ttl)

    def _unadvertise(self) -> None:
        with contextlib.suppress(RedisError):
            self.connection.delete(worker_key(self.name))
