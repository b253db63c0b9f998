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
from redis.exceptions import RedisError, WatchError
from rq import worker_registration
from rq.executions import Execution
from rq.job import Job, JobStatus, validate_job_id
from rq.queue import Queue
from rq.registry import clean_registries
from rq.utils import now, utcformat
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
    advertise_worker,
    image_key,
    queue_name,
    withdraw_worker,
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


# Move the first job of the first non-empty queue (KEYS: queue, its intermediate list, ...)
# to the end of that queue's intermediate list, in one atomic step.
_TAKE = """
for i = 1, #KEYS, 2 do
  local id = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT')
  if id then return {KEYS[i], id} end
end
return false
"""


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
        self._unstarted: list[tuple[Job, Queue]] = []   # dequeued as Redis went away
        self._take_script = connection.register_script(_TAKE)
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
                try:
                    self._put_back_unstarted()
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
                except RedisError as e:
                    if not self._wait_for_redis(e):
                        break
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

    def clean_registries(self) -> None:
        """RQ's pass, under a per-queue lock that expires after one maintenance interval (at
        least 10 s) instead of RQ's 899 s: a worker SIGKILLed mid-pass leaves its lock behind,
        and while the lock lives no worker re-queues that queue's abandoned jobs."""
        ttl = max(10, self.settings.maintenance_interval)
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=ttl):
                log.debug("cleaning registries for queue %s", queue.name)
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        self._clean_canceled()

    def _clean_canceled(self) -> None:
        """RQ never cleans its canceled registries, and a job canceled without us (`rq`,
        `worker.client.cancel`) keeps its hash forever. Like finished jobs: each newly
        canceled job's hash gets the result TTL and its member is re-scored to expire with
        it; members whose job is gone are removed. Touches only members due (score ≤ now)."""
        t = time.time()
        for queue in self.queues:
            key = queue.canceled_job_registry.key
            due = self.connection.zrangebyscore(key, 0, t)
            if not due:
                continue
            with self.connection.pipeline(transaction=False) as p:
                for job_id in due:
                    p.ttl(Job.key_for(job_id.decode()))
                ttls = p.execute()
            with self.connection.pipeline(transaction=False) as p:
                for job_id, ttl in zip(due, ttls, strict=True):
                    if ttl == -2:                      # expired or deleted
                        p.zrem(key, job_id)
                        continue
                    if ttl == -1:
                        ttl = self.settings.result_ttl
                        p.expire(Job.key_for(job_id.decode()), ttl)
                    p.zadd(key, {job_id: t + ttl}, xx=True)
                p.execute()

    # -- Redis outages ---------------------------------------------------------------

    def _wait_for_redis(self, error: RedisError) -> bool:
        """Redis went away mid-pass: pause (nothing could be stored anyway) until it answers,
        instead of dying with every running job. Maintenance then waits one more interval,
        so every worker renews its executions (unrenewed while Redis was down) before any of
        them can be judged abandoned and run twice. False: asked to stop and the grace
        period is over; the running jobs come back through their expiring executions.
        """
        log.error("Redis unavailable (%s): pausing until it is back", error)
        while True:
            if self._stop_requested and self._drain_deadline is not None \
                    and time.monotonic() >= self._drain_deadline:
                return False
            time.sleep(1)
            try:
                self.connection.ping()
            except RedisError:
                continue
            log.warning("Redis is back: resuming %d running jobs", len(self.live))
            self.last_cleaned_at = now()
            return True

    def _put_back_unstarted(self) -> None:
        """Jobs dequeued just as Redis went away, before they were marked started, are in no
        queue and no registry: only this worker knows them, so it puts them back in front."""
        while self._unstarted:
            job, queue = self._unstarted[0]
            with self.connection.pipeline() as p:
                for execution in [e for e in self.executions.values() if e.job_id == job.id]:
                    self.cleanup_execution(job, p, execution)    # half-made, if any
                queue.enqueue_job(job, pipeline=p, at_front=True)
                p.lrem(queue.intermediate_queue_key, 1, job.id)
                p.execute()
            self._unstarted.pop(0)
            log.warning("job %s put back on %s after a Redis error", job.id, queue.name)

    # -- admit -----------------------------------------------------------------------

    def _admit(self, *, block: bool) -> bool:
        """Take jobs while the engine has room; wait up to 1 s for the first when idle."""
        took = False
        while self.engine.has_room() and not self._stop_requested:
            try:
                result = self._take(wait=1.0 if block and not took else 0.0)
            except RedisError as e:
                log.error("dequeue failed: %s; retrying", e)
                time.sleep(1)
                return took
            except Exception as e:
                # A popped job whose hash RQ cannot load (RQ names it on the error): that
                # job fails; the worker and its running jobs go on.
                job_id = getattr(e, "job_id", None)
                if job_id is None:
                    raise
                self._fail_unreadable(str(job_id), getattr(e, "queue", None), e)
                continue
            if result is None:
                return took
            job, queue = result
            self._start(job, queue)
            took = True
        return took

    def _take(self, wait: float) -> tuple[Job, Queue] | None:
        """The next job in priority order, moved atomically from its queue into the queue's
        intermediate list, where it stays until RQ's bookkeeping marks it started.

        RQ pops with plain LPOP/BLPOP when a worker listens on several queues (ours listens
        on one per model and priority): a worker killed between that pop and marking the job
        started lost the job for good (3 of 48 in test_worker_chaos.py's admission test).
        From the intermediate list RQ's maintenance re-queues it instead. No blocking
        variant exists for several lists, so an idle worker polls every 20 ms for `wait` s.
        """
        deadline = time.monotonic() + wait
        keys = [k for q in self._ordered_queues for k in (q.key, q.intermediate_queue_key)]
        while True:
            hit = self._take_script(keys=keys)
            if hit:
                queue_key, job_id = (v.decode() if isinstance(v, bytes) else v for v in hit)
                result = Queue._fetch_dequeued_job(
                    self.connection, queue_key, job_id, job_class=self.job_class,
                    serializer=self.serializer)
                if result is not None:
                    return result
                # The job's hash is gone (expired, deleted): forget it and look again.
                self.connection.lrem(Queue.from_queue_key(
                    queue_key, connection=self.connection).intermediate_queue_key, 1, job_id)
                continue
            if self._stop_requested or time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _prune_dead_executions(self, job: Job) -> None:
        """Drop expired executions (a killed worker's) from the job's execution registry.
        RQ keeps their entries ~60 s past the execution itself, and meanwhile `job.cancel()`
        of the re-run job raises ValueError: "Execution ... not found in Redis"."""
        key = job.execution_registry.key
        ids = [i.decode() for i in self.connection.zrange(key, 0, -1)]
        if not ids:
            return
        with self.connection.pipeline(transaction=False) as p:
            for i in ids:
                p.exists(Execution(i, job.id, self.connection).key)
            alive = p.execute()
        dead = [i for i, a in zip(ids, alive, strict=True) if not a]
        if dead:
            self.connection.zrem(key, *dead)

    def _mark_started(self, job: Job, queue: Queue) -> bool:
        """RQ's bookkeeping before a job runs (`prepare_job_execution`), but never over a
        cancellation: RQ writes `started` unconditionally, so a cancel between the dequeue
        and here was lost (the job ran to success after its DELETE said canceled). Under
        WATCH; False, with the job left canceled, if it was canceled since its dequeue.
        Either way the job leaves its queue's intermediate list."""
        intermediate = queue.intermediate_queue_key
        with self.connection.pipeline() as p:
            while True:
                try:
                    p.watch(job.key)
                    if p.hget(job.key, "status") == JobStatus.CANCELED.value.encode():
                        p.lrem(intermediate, 1, job.id)      # still in watch (immediate) mode
                        return False
                    p.multi()
                    ttl = self.get_heartbeat_ttl(job)
                    self.heartbeat(ttl, pipeline=p)
                    job.heartbeat(now(), ttl, pipeline=p)
                    job.prepare_for_execution(self.name, pipeline=p)
                    p.persist(job.key)
                    p.lrem(intermediate, 1, job.id)
                    p.execute()
                    return True
                except WatchError:
                    continue          # the job changed (canceled?) meanwhile: look again

    def _start(self, job: Job, queue: Queue) -> None:
        try:
            self._prune_dead_executions(job)
            execution = self.prepare_execution(job)
            canceled = not self._mark_started(job, queue)   # reads no payload: parse_spec
        except RedisError:
            self._unstarted.append((job, queue))   # in no queue and no registry: put back
            raise
        if canceled:
            self._drop(Running(job=job, queue=queue, execution=execution), "canceled")
            return
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
        hooks, job.webhooks = job.webhooks, []     # RQ would send them here, on this thread
        try:
            with self._lock:
                # Raises RedisError with the job still live: the next _retire tries again.
                self._finalize_success(job, run.queue, run.execution, result.to_dict())
                self.live.pop(job.id, None)
        finally:
            job.webhooks = hooks
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

    def _fail_unreadable(self, job_id: str, queue: Queue | None, error: Exception) -> None:
        """Fail, by hand, a dequeued job whose hash RQ cannot load (its status, the failed
        registry, an error event): none of RQ's job methods work on it."""
        message = f"job cannot be read: {type(error).__name__}: {error}"
        log.warning("job %s failed: %s", job_id, message)
        if queue is not None:
            self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
        try:
            validate_job_id(job_id)
        except (TypeError, ValueError):
            return                      # not even a job id: nothing to mark
        ttl = self.settings.result_ttl
        with self.connection.pipeline() as p:
            p.hset(Job.key_for(job_id), mapping={"status": JobStatus.FAILED.value,
                                                 "ended_at": utcformat(now())})
            p.expire(Job.key_for(job_id), ttl)
            if queue is not None:
                p.zadd(queue.failed_job_registry.key, {job_id: time.time() + ttl})
            p.execute()
        self.writer.event(job_id, Event(EventType.ERROR, {"message": message}))
        self.metrics.jobs.labels("failed").inc()

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
        advertise_worker(self.connection, self.name, json.dumps(doc), ttl, time.time())

    def _unadvertise(self) -> None:
        with contextlib.suppress(RedisError):
            withdraw_worker(self.connection, self.name)
