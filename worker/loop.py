"""The RQ worker that runs many jobs at once through the continuous-batching engine.

RQ stays the source of truth for job state. Each admitted job gets its own RQ execution
(RQ ≥ 3 tracks several per worker), so queues, the started/finished/failed/canceled
registries, results, `rq info` and rq-dashboard stay right while dozens of jobs share one
batch. One pass of the loop:

    admit    take as many jobs as the engine has room for and mark them started: two
             round-trips for all of them (rq_jobs.py); when idle, block until an
             enqueue wakes it (≤ 1 s)
    step     one engine step: a UNet forward per model over every active slot
    emit     the step's frames, progress and started events → one writer batch: encoded
             and sent to Redis by the writer thread as one command (events.py)
    retire   jobs whose writes are all in Redis → RQ success, together (live.py)
    control  canceled or stopped jobs → slots freed (every CONTROL_INTERVAL)

A side thread renews the heartbeats of every live execution in one pipeline, so a slow
step never makes a live job look abandoned; if this process dies, its executions expire
and a live worker's maintenance pass re-queues the jobs (RQ `Retry`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from typing import Any

import torch
from redis import Redis
from redis.exceptions import RedisError
from rq.command import handle_command, parse_payload
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import now
from rq.worker.base import BaseWorker, WorkerStatus

from contract.events import Event, EventType
from contract.keys import SERIALIZER, WAKE_TIMEOUT, input_key, queue_name, wake_key
from contract.limits import PRIORITIES
from contract.redis_errors import redis_full
from contract.workers import advertise_worker, withdraw_worker

from .catalog import Catalog
from .engine import Engine, StepOutOfMemory, StepReport, input_tensors
from .events import Batch, EventWriter
from .frames import FrameExpiry
from .live import JobError, LiveJob, LiveJobs, parse_spec
from .metrics import WorkerMetrics
from .rq_jobs import BatchJob, RqJobs, Unreadable, enqueued_wait
from .settings import WorkerSettings

log = logging.getLogger("ddpm.worker")

CONTROL_INTERVAL = 0.25     # seconds between checks for canceled jobs
FULL_PAUSE = 0.5            # seconds a pass waits after Redis refused a write (maxmemory)
# Seconds RQ's command listener waits at a time (RQ: 60): how long stopping it can take.
PUBSUB_POLL = 0.5
PUBSUB_JOIN = 5.0           # seconds shutdown waits for that listener at most


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
                         serializer=SERIALIZER, job_class=BatchJob,
                         worker_ttl=settings.worker_ttl,
                         maintenance_interval=settings.maintenance_interval,
                         job_monitoring_interval=int(settings.heartbeat_interval),
                         default_result_ttl=settings.result_ttl)
        self.writer = EventWriter(
            connection, ttl=settings.result_ttl, maxlen=settings.stream_maxlen,
            stream_max_bytes=settings.stream_max_bytes, snapshot_ttl=settings.snapshot_ttl,
            max_pending_bytes=settings.writer_max_pending_bytes,
            encode_threads=settings.encode_threads,
            on_drop=self.metrics.snapshots_dropped.inc, on_full=self._redis_full)
        self._expire_frames = FrameExpiry(connection)
        self.rq = RqJobs(self)
        self.live = LiveJobs(self.rq, engine, self.writer, self.metrics)
        self._stop_exec: set[str] = set()       # execution ids `rq` asked to stop
        self._beat_stop = threading.Event()
        self._drain_deadline: float | None = None
        self._last_control = 0.0
        self._beats_missed = False              # a heartbeat failed since the last one worked
        self._full_since: float | None = None   # when Redis began refusing writes (maxmemory)
        self._unstarted: list[tuple[Job, Queue]] = []   # taken as Redis went away
        self._wake_keys = [wake_key(m) for m in catalog.names]
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

    def subscribe(self) -> None:
        """RQ's listener for `rq` commands (stop-job...), waiting PUBSUB_POLL s at a time
        instead of RQ's 60 s, so that stopping it never waits long (see `unsubscribe`)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name,
                      self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_POLL, daemon=True,
            exception_handler=self._pubsub_exception_handler)

    def unsubscribe(self) -> None:
        """Stop the listener without waiting on its timeout. RQ's sends UNSUBSCRIBE, then
        stops the thread: when the thread reads that reply first, it has no subscription
        left, so its next `get_message` waits for one (`subscribed_event.wait(60)`), and
        `PubSubWorkerThread.stop()` joins it (redis-py 8: without a timeout), so a SIGTERMed
        worker took up to 60 s to exit (4 runs in 20). Here the thread is stopped while still
        subscribed and waits PUBSUB_POLL s at a time, so it leaves within that; closing its
        connection ends the subscription."""
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        log.debug("unsubscribing from channel %s", self.pubsub_channel_name)
        self.pubsub_thread = None
        thread.stop()                   # clears its flag (redis-py 8 also joins it)
        thread.join(timeout=PUBSUB_JOIN)
        if thread.is_alive():           # a handler still running: the thread is a daemon
            log.warning("RQ's command listener did not stop within %.0fs", PUBSUB_JOIN)
        else:
            pubsub.close()              # done by the thread as it ends; harmless twice

    def request_stop_execution(self, execution_id: str) -> None:
        """`rq`'s stop-execution command (pubsub thread): the loop stops that job at its
        next control pass."""
        with self.live.lock:
            self._stop_exec.add(execution_id)

    def handle_payload(self, message: dict[str, Any]) -> None:
        """`rq`'s commands (pubsub thread). RQ answers stop-job only for the worker's one
        "current job" (`get_current_job_id`: the first of its executions), so it ignored
        every other job this worker runs: here stop-job stops any job running here."""
        payload = parse_payload(message)
        if payload.get("command") == "stop-job":
            self.request_stop_job(str(payload.get("job_id") or ""))
        else:
            handle_command(self, payload)

    def request_stop_job(self, job_id: str) -> None:
        run = self.live.get(job_id)
        if run is None:
            log.warning("stop-job: job %s is not running on this worker; ignored", job_id)
            return
        log.info("stop-job: stopping job %s", job_id)
        self.request_stop_execution(run.execution.id)

    # -- the loop --------------------------------------------------------------------

    def work(self, burst: bool = False, logging_level: str | None = None,  # type: ignore[override]
             **_: Any) -> bool:
        """Run until stopped (or, with `burst`, until the queues are empty and all is done)."""
        self.bootstrap(logging_level or self.settings.log_level)
        self._install_signal_handlers()
        self.advertise()
        self._beat_stop.clear()
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
                    batch = Batch()
                    if not self._stop_requested:
                        idle = not self.engine.busy and not self.live
                        if self._admit(batch, block=idle and not burst):
                            worked = True
                    stepped = self.engine.busy and not self.writer.behind
                    if stepped:
                        self._emit(self._step(batch), batch)
                    self._send(batch)
                    self._retire()
                    self._gauges()
                    if not self.live:
                        if self._stop_requested:
                            break
                        if burst and not self._queues_have_jobs():
                            break
                        self.set_state(WorkerStatus.IDLE)
                    elif self._stop_requested and self._drain_deadline is not None \
                            and time.monotonic() >= self._drain_deadline:
                        self.live.requeue_all()
                        break
                    elif not stepped and not self.engine.busy:
                        self._wait_for_writes()     # nothing to take, nothing to compute
                    elif not stepped:               # the writer is behind: let it catch up
                        self.metrics.writer_waits.inc()
                        self.writer.wait_until_caught_up(timeout=0.05)
                except RedisError as e:
                    if redis_full(e):               # writes wait for room; reads still work
                        self._redis_full()
                        time.sleep(FULL_PAUSE)
                    elif not self._wait_for_redis(e):
                        break
        finally:
            self._beat_stop.set()
            beats.join(timeout=5)
            self.writer.close()
            self.live.close()
            self._unadvertise()
            self.teardown()
        return worked

    def _queues_have_jobs(self) -> bool:
        return any(q.count for q in self.queues)

    def clean_registries(self) -> None:
        """RQ's pass, with a short-lived lock (RqJobs.clean_registries)."""
        self.rq.clean_registries(self.queues, max(10, self.settings.maintenance_interval))
        self.last_cleaned_at = now()

    def clean_group_registries(self) -> None:
        """RQ's group pass, quietly (RqJobs.clean_group_registries)."""
        self.rq.clean_group_registries(max(self.settings.maintenance_interval - 1, 1))

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        self.rq.clean_canceled(self.queues, self.settings.result_ttl)
        self._expire_frames(time.time())

    def _redis_full(self) -> None:
        """Redis refused a write for want of memory (maxmemory, noeviction). Nothing is
        dropped: the writer holds its writes and retries them, the loop soon waits for it,
        no job is taken. Executions are not renewed meanwhile, so maintenance waits one
        interval past the next successful heartbeat before any job can look abandoned
        (_heartbeat_loop). Called from the loop and the writer's and heartbeat threads."""
        self.metrics.redis_full.inc()
        self._beats_missed = True
        if self._full_since is None:
            self._full_since = time.monotonic()
            log.warning("Redis is full (maxmemory): %d running jobs wait for room, no new "
                        "jobs are taken", len(self.live))

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
        while self._unstarted:
            job, queue = self._unstarted[0]
            self.rq.put_back(job, queue)
            self._unstarted.pop(0)
            log.warning("job %s put back on %s after a Redis error", job.id, queue.name)

    # -- admit -----------------------------------------------------------------------

    def _admit(self, batch: Batch, *, block: bool) -> bool:
        """Take as many jobs as the engine has room for (every job has at least one image);
        when idle, wait up to 1 s for one, woken by the token each enqueue pushes
        (contract.wake_commands; no blocking pop exists for several lists)."""
        deadline = time.monotonic() + (1.0 if block else 0.0)
        took = False
        while self.engine.has_room(self.settings.admission) and not self._stop_requested:
            try:
                taken, bad = self.rq.take(self._ordered_queues, self.engine.room)
            except RedisError as e:
                if redis_full(e):
                    self._redis_full()
                else:
                    log.error("dequeue failed: %s; retrying", e)
                time.sleep(1)
                return took
            for b in bad:
                self._fail_unreadable(b)
            if taken:
                self._start(taken, batch)
                took = True
                continue
            if bad:
                continue
            left = deadline - time.monotonic()
            if took or self._stop_requested or left <= 0:
                return took
            self.connection.blpop(self._wake_keys, timeout=max(0.01, min(left, WAKE_TIMEOUT)))
        return took

    def _start(self, taken: list[tuple[Job, Queue]], batch: Batch | None = None) -> None:
        """Mark `taken` started (RqJobs.start) and admit each into the engine; a job that
        cannot run fails alone, with the reason."""
        try:
            started, canceled = self.rq.start(taken)
        except RedisError:
            self._unstarted.extend(taken)   # in no queue and no registry: put back
            raise
        for job in canceled:
            self.live.canceled_before_start(job)
        own = batch if batch is not None else Batch()
        runs: list[LiveJob] = []
        for s in started:
            job = s.job
            run = LiveJob(job=job, queue=s.queue, execution=s.execution,
                          queue_wait=enqueued_wait(job, job.started_at))
            self.metrics.queue_wait.observe(run.queue_wait)
            self.live.add(run)
            try:
                run.spec = parse_spec(job)
                if run.spec.model in self.catalog.broken:
                    raise JobError(self.catalog.broken[run.spec.model])
            except JobError as e:
                self.live.fail(run, str(e), retry=False)
                continue
            runs.append(run)
        try:
            pngs = self._input_images(runs)
        except RedisError as e:             # RQ's Retry brings them back
            for run in [r for r in runs if r.spec.inputs]:
                runs.remove(run)
                self.live.fail(run, f"input images could not be read: {e}", retry=True)
            pngs = {}
        for run in runs:
            job = run.job
            try:
                model = self.engine.models.get(run.spec.model)
                inputs = input_tensors(run.spec, pngs.get(job.id, {}), model.info) \
                    if model is not None else None
                self.engine.admit(job.id, run.spec, inputs)     # ValueError: not served
            except ValueError as e:
                self.live.fail(run, str(e), retry=False)
                continue
            run.preview = run.spec.preview(model.info.image_size)   # type: ignore[union-attr]
            own.event(job.id, Event(EventType.STARTED, {
                "worker": self.name, "model": run.spec.model,
                "num_images": run.spec.num_images, "steps": run.spec.steps_per_image,
                "queue_wait_s": round(run.queue_wait, 3)}))
            log.info("job %s started: %s ×%d, %s %d steps", job.id, run.spec.model,
                     run.spec.num_images, run.spec.sampler, run.spec.steps)
        if batch is None:
            self._send(own)

    def _input_images(self, runs: list[LiveJob]) -> dict[str, dict[str, bytes | None]]:
        """The stored input images of these jobs (job → field → PNG): one MGET for all."""
        wanted = [(run.job.id, f) for run in runs for f in run.spec.inputs]
        if not wanted:
            return {}
        found = self.connection.mget([input_key(job_id, f) for job_id, f in wanted])
        out: dict[str, dict[str, bytes | None]] = {}
        for (job_id, f), png in zip(wanted, found, strict=True):
            out.setdefault(job_id, {})[f] = png
        return out

    def _fail_unreadable(self, bad: Unreadable) -> None:
        message = f"job cannot be read: {bad}"
        log.warning("job %s failed: %s", bad.job_id, message)
        self.rq.fail_unreadable(bad, self.settings.result_ttl)
        self.writer.event(bad.job_id, Event(EventType.ERROR, {"message": message}))
        self.metrics.jobs.labels("failed").inc()

    # -- step and emit ----------------------------------------------------------------

    def _step(self, batch: Batch) -> StepReport:
        """One engine step. A model out of memory at one row fails its jobs (RQ may retry
        them, on this worker or another), never the worker or the other models' jobs."""
        try:
            report = self.engine.step()
        except StepOutOfMemory as e:
            report = e.report
            for model, error in e.failed.items():
                for job_id in self.engine.jobs_of(model):
                    run = self.live.get(job_id)
                    if run is not None:
                        self.live.fail(run, f"out of memory on {self.engine.device} even "
                                       f"one image at a time: {error}", retry=True,
                                       batch=batch)
                    else:
                        self.engine.cancel(job_id)
        return report

    def _gauges(self) -> None:
        """Every gauge the worker sets, as things stand now, once per pass: set only after
        a step, they kept their last value when the worker went idle (16 active slots after
        a 16-image job, though nothing ran) or a job ended without a step (canceled)."""
        m = self.metrics
        m.active.set(self.engine.active)
        m.waiting.set(self.engine.waiting)
        m.writer_pending.set(self.writer.pending_bytes)
        if self.engine.device.type == "cuda":
            m.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(self.engine.device))
            m.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(self.engine.device))

    def _emit(self, report: StepReport, batch: Batch) -> None:
        """The step's frames and (throttled) progress, into this pass's writer batch."""
        m = self.metrics
        slots = sum(report.slots.values())
        m.occupancy.observe(slots / self.engine.max_batch)
        for model, n in report.slots.items():
            m.steps.labels(model).inc(n)
            m.forward.labels(model).observe(report.forward_seconds[model])
        for frame in report.frames:
            run = self.live.get(frame.job_id)
            if run is None or run.spec is None:
                continue
            assert run.preview is not None
            batch.frame(frame, run.spec.steps_per_image, run.spec.snapshot_kind, run.preview)
            if frame.final:
                m.images.labels(run.spec.model).inc()
        t = time.monotonic()
        for p in report.progress:
            run = self.live.get(p.job_id)
            if run is None or run.spec is None:
                continue
            run.complete = p.done
            if p.done or t - run.last_progress >= self.settings.progress_interval:
                run.last_progress = t
                self._progress(run, p.steps_done, p.images_done, p.image_steps, batch)

    def _progress(self, run: LiveJob, steps_done: int, images_done: int,
                  image_steps: list[int], batch: Batch) -> None:
        assert run.spec is not None
        total = run.spec.total_steps
        data = {"steps_done": steps_done, "total_steps": total, "images_done": images_done,
                "num_images": run.spec.num_images, "image_steps": image_steps}
        job = run.job
        job.meta.update(progress=round(steps_done / total, 4), steps_done=steps_done,
                        images_done=images_done, image_steps=image_steps)
        try:
            meta = job._serialize_meta()       # RQ's save_meta, written with the events
        except Exception as e:   # meta RQ could not read, so it cannot be written back
            self.live.fail(run, f"storing results failed: {type(e).__name__}: {e}",
                           retry=True, batch=batch)
            return
        batch.event(run.id, Event(EventType.PROGRESS, data))
        batch.hset(run.id, job.key, "meta", meta)

    def _send(self, batch: Batch) -> None:
        seq = self.writer.send(batch)
        for job_id in batch.jobs:
            run = self.live.get(job_id)
            if run is not None:
                run.last_seq = seq

    def _wait_for_writes(self) -> None:
        """Nothing to compute, only writes outstanding: wait for the writer, briefly."""
        pending = [r.last_seq for r in self.live if r.complete]
        if pending:
            self.writer.wait(max(pending), timeout=0.05)
        else:
            time.sleep(0.005)

    # -- retire ----------------------------------------------------------------------

    def _retire(self) -> None:
        """Jobs whose images and events are all in Redis succeed, together; a job whose
        writes failed fails with a retry."""
        ready = []
        for run in self.live:
            if not run.complete or not self.writer.flushed(run.last_seq):
                continue
            error = self.writer.error(run.id)
            if error is not None:
                self.live.fail(run, f"storing results failed: {error}", retry=True)
            else:
                ready.append(run)
        self.live.succeed(ready)

    # -- control: cancellations and stop requests --------------------------------------

    def _control(self) -> None:
        t = time.monotonic()
        if not self.live or t - self._last_control < CONTROL_INTERVAL:
            return
        self._last_control = t
        runs = list(self.live)
        statuses = self.rq.statuses([r.job for r in runs])
        with self.live.lock:
            stop, self._stop_exec = self._stop_exec, set()
        for run, status in zip(runs, statuses, strict=True):
            if self.live.get(run.id) is None:
                continue
            if status is None:
                self.live.cancel(run, "job was deleted")
            elif status.decode() == JobStatus.CANCELED:
                self.live.cancel(run, "canceled")
            elif run.execution.id in stop:
                self.live.fail(run, "stopped by request", retry=False, stopped=True)

    # -- liveness and advertisement ----------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._beat_stop.wait(self.settings.heartbeat_interval):
            try:
                with self.live.lock:
                    self.rq.heartbeat(self.live.executions())
                self.advertise()
                if self._beats_missed:
                    # Executions were not renewed while Redis refused writes: now they are,
                    # the other workers' too within an interval; no maintenance before that.
                    self._beats_missed = False
                    self.last_cleaned_at = now()
                if self._full_since is not None:
                    log.warning("Redis has room again after %.1fs",
                                time.monotonic() - self._full_since)
                    self._full_since = None
            except RedisError as e:
                self._beats_missed = True
                if redis_full(e):
                    self._redis_full()
                else:
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
