"""The batching worker: many RQ jobs at once through the continuous-batching engine.

RQ stays the source of truth for job state, behind one door (rqside/side.py: every RQ write and
read of this worker, in plain values). Each admitted job gets its own RQ execution (RQ ≥ 3
tracks several per worker), so queues, the started/finished/failed/canceled registries,
results, `rq info` and rq-dashboard stay right while dozens of jobs share one batch. One pass
of the loop:

    admit    take as many jobs as the engine has room for and mark them started: two
             round-trips for all of them (admission.py); when idle, block until an
             enqueue wakes it (≤ 1 s)
    step     one engine step: a UNet forward per model over every active slot
    emit     the step's frames, progress and started events → one writer batch: encoded
             and sent to Redis by the writer thread as one command (events.py)
    retire   jobs whose writes are all in Redis → RQ success, together (live.py)
    control  canceled or stopped jobs → slots freed (every CONTROL_INTERVAL)

Heartbeats, the advertisement and Redis outages are upkeep.py's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import torch
from redis import Redis
from redis.exceptions import RedisError

from contract import tracing
from contract.events import Progress
from contract.keys import queue_name
from contract.limits import PRIORITIES
from contract.redis_errors import redis_full

from .admission import Admission
from .catalog import Catalog
from .drain import Resumer
from .engine import Engine, StepOutOfMemory, StepReport
from .events import Batch, EventWriter
from .frames import FrameExpiry
from .live import LiveJob, LiveJobs
from .metrics import WorkerMetrics
from .rqside import RqSide
from .settings import WorkerSettings
from .throughput import WorkMeter
from .upkeep import Upkeep
from .webhooks import WebhookSender

log = logging.getLogger("ddpm.worker")

CONTROL_INTERVAL = 0.25     # seconds between checks for canceled jobs
FULL_PAUSE = 0.5            # seconds a pass waits after Redis refused a write (maxmemory)


class BatchWorker:
    """A worker whose RQ jobs are slots of one continuously batched diffusion loop."""

    def __init__(self, settings: WorkerSettings, connection: Redis, catalog: Catalog,
                 engine: Engine, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.connection = connection
        self.catalog = catalog
        self.engine = engine
        self.metrics = metrics or WorkerMetrics()
        queues = [queue_name(m, p) for p in PRIORITIES for m in catalog.names]
        if not queues:
            raise ValueError("no models to serve")
        # Completion webhooks (URLs stored on the RQ job) go out from their own threads: a
        # slow or dead endpoint must never hold up the step loop or a job's event stream.
        self.webhooks = WebhookSender(settings, self.metrics)
        self._stop_jobs: set[str] = set()       # job ids `rq` asked to stop
        self._stop_lock = threading.Lock()
        self.rq = RqSide(connection, queues, name=settings.name,
                         worker_ttl=settings.worker_ttl,
                         maintenance_interval=settings.maintenance_interval,
                         heartbeat_interval=settings.heartbeat_interval,
                         execution_ttl=settings.execution_ttl, result_ttl=settings.result_ttl,
                         notify=self.webhooks.send, on_stop_job=self._request_stop_job)
        self.name = self.rq.name
        self.upkeep = Upkeep(connection, self.rq, settings, self.metrics,
                             advertisement=self._advertisement, running=lambda: len(self.live))
        self.writer = EventWriter(
            connection, ttl=settings.result_ttl, maxlen=settings.stream_maxlen,
            stream_max_bytes=settings.stream_max_bytes, snapshot_ttl=settings.snapshot_ttl,
            max_pending_bytes=settings.writer_max_pending_bytes,
            encode_threads=settings.encode_threads,
            on_drop=self.metrics.snapshots_dropped.inc, on_full=self.upkeep.redis_full)
        self._expire_frames = FrameExpiry(connection)
        self.live = LiveJobs(self.rq, engine, self.writer, self.metrics)
        self.admission = Admission(connection, self.rq, engine, self.live, self.writer,
                                   catalog, self.metrics, settings, self.upkeep.redis_full)
        self.resumer = Resumer(self.rq, engine, self.live, self.writer, self.metrics, settings)
        self.work_meter = WorkMeter(engine, connection, readvertise=self.upkeep.advertise)
        self.image_steps = 0        # slot steps computed (the reliability suite's work count)
        self.stop_requested = False
        self._drain_deadline: float | None = None
        self._last_control = 0.0
        self._traced = tracing.enabled()    # step spans (contract/tracing.py): one bool a pass
        self.last_pass = time.monotonic()   # when the loop last began a pass (probes.py)
        for name, m in catalog.loaded.items():
            self.metrics.model_load.labels(name).set(m.load_seconds)

    # -- stopping --------------------------------------------------------------------

    def request_stop(self, signum: Any = None, frame: Any = None) -> None:
        """First signal: stop admitting; after the step in flight, every running job but
        those within `drain_finish_steps` of done goes back to its queue with its resume
        state (worker/drain.py); those finish within the grace period. Second: re-queue
        what is running now. Never raises inside the step (unlike RQ's default)."""
        if self.stop_requested:
            log.warning("second stop signal: re-queueing running jobs now")
            self._drain_deadline = time.monotonic()
            return
        log.info("stop requested at %d image-steps: no new jobs; %d running are re-queued "
                 "with their state after this step (those within %d steps of done get %.0fs "
                 "to finish)", self.image_steps, len(self.live),
                 self.settings.drain_finish_steps, self.settings.grace_period)
        self.stop_requested = True
        self.rq.note_stop_requested()
        self._drain_deadline = time.monotonic() + self.settings.grace_period

    def _past_grace(self) -> bool:
        return self.stop_requested and self._drain_deadline is not None \
            and time.monotonic() >= self._drain_deadline

    def _request_stop_job(self, job_id: str) -> None:
        """`rq`'s stop-job or stop-execution of a job running here (the command thread):
        the loop stops it at its next control pass."""
        with self._stop_lock:
            self._stop_jobs.add(job_id)

    # -- the loop --------------------------------------------------------------------

    def work(self, burst: bool = False, logging_level: str | None = None) -> bool:
        """Run until stopped (or, with `burst`, until the queues are empty and all is done)."""
        self.rq.register(logging_level or self.settings.log_level)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        self.upkeep.start()
        worked = False
        try:
            while True:
                self.last_pass = time.monotonic()
                try:
                    self.admission.put_back_unstarted()
                    if self.rq.maintenance_due():
                        self.run_maintenance()
                    self._control()
                    batch = Batch()
                    if not self.stop_requested:
                        idle = not self.engine.busy and not self.live
                        if self.admission.admit(batch, block=idle and not burst,
                                                stopping=lambda: self.stop_requested):
                            worked = True
                    stepped = self.engine.busy and not self.writer.behind
                    if stepped:
                        self._emit(self._step(batch), batch)
                        self.resumer.stepped(batch)     # a checkpoint, every N steps
                    self.live.send(batch)
                    self._retire()
                    self._gauges()
                    if self.stop_requested and self.live:
                        self._drain()
                    if not self.live:
                        if self.stop_requested:
                            break
                        if burst and not self.rq.queues_have_jobs():
                            break
                        self.rq.set_idle()
                    elif self._past_grace():
                        self.live.requeue_all()     # complete ones whose writes hang
                        break
                    elif not stepped and not self.engine.busy:
                        self._wait_for_writes()     # nothing to take, nothing to compute
                    elif not stepped:               # the writer is behind: let it catch up
                        self.metrics.writer_waits.inc()
                        self.writer.wait_until_caught_up(timeout=0.05)
                except RedisError as e:
                    if redis_full(e):               # writes wait for room; reads still work
                        self.upkeep.redis_full()
                        time.sleep(FULL_PAUSE)
                    elif not self.upkeep.wait_for_redis(e, self._past_grace):
                        break
        finally:
            log.info("worker stopped after %d image-steps", self.image_steps)
            self.upkeep.stop()
            self.writer.close()
            self.webhooks.close()
            self.upkeep.withdraw()
            self.rq.close()
        return worked

    def _drain(self) -> None:
        """Stopping: the jobs due to leave (all of them past the grace period) go back
        with their resume states, in one round-trip, once their frames are written."""
        past = self._past_grace()
        runs = self.resumer.drain_now(past_grace=past)
        if not runs:
            return
        bound = time.monotonic() + 5.0              # Redis gone: do not wait forever
        self.resumer.drain(runs, until=lambda: self._past_grace() and (
            not past or time.monotonic() > bound))

    def run_maintenance(self) -> None:
        """RQ's maintenance (abandoned jobs back, registries cleaned) and the frames due to
        expire."""
        self.rq.run_maintenance()
        self._expire_frames(time.time())

    def clean_registries(self) -> None:
        """RQ's registry pass now (registries.clean_registries)."""
        self.rq.clean_registries()

    # -- step and emit ----------------------------------------------------------------

    def _step(self, batch: Batch) -> StepReport:
        """One engine step. A model out of memory at one row fails its jobs (RQ may retry
        them, on this worker or another), never the worker or the other models' jobs."""
        t0 = time.time_ns() if self._traced else 0
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
        if self._traced:
            self._step_spans(report, t0)
        return report

    def _step_spans(self, report: StepReport, t0: int) -> None:
        """A `step` span per model stepped (its forwards one after another from `t0`), a
        child of its oldest job's span, linked to every job's span in it (tracing.py)."""
        runs: dict[str, list[LiveJob]] = {}
        for p in report.progress:
            run = self.live.get(p.job_id)
            if run is not None and run.span is not None and run.spec is not None:
                runs.setdefault(run.spec.model, []).append(run)
        start = t0
        for model, slots in report.slots.items():
            end = start + int(report.forward_seconds[model] * 1e9)
            jobs = sorted(runs.get(model, []), key=lambda r: r.started)
            tracing.step_span(model, slots, [r.span for r in jobs if r.span is not None],
                              start_ns=start, end_ns=end)
            start = end

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
        self.work_meter.stepped(report)         # the work signal's rate (throughput.py)
        slots = sum(report.slots.values())
        self.image_steps += slots
        m.occupancy.observe(slots / self.engine.max_batch)
        for model, n in report.slots.items():
            m.steps.labels(model).inc(n)
            m.forward.labels(model).observe(report.forward_seconds[model])
        get = self.live.get
        finals: dict[str, int] = {}
        ending = {p.job_id for p in report.progress if p.done}
        for frame in report.frames:
            run = get(frame.job_id)
            if run is None or run.spec is None:
                continue
            # labelled by its job's frame plan (frame.plan); a final one traced under its
            # job; the last step's images announced with the job's `done` (LiveJob.held)
            last = frame.final and frame.job_id in ending
            op = batch.frame(frame, span=run.span if frame.final else None, announce=not last)
            if last:
                run.held.append(op.event())
            if frame.final:
                finals[run.spec.model] = finals.get(run.spec.model, 0) + 1
        for model, n in finals.items():
            m.images.labels(model).inc(n)
        # Every running job has an entry per step: this loop is per job and step.
        t, interval = time.monotonic(), self.settings.progress_interval
        for p in report.progress:
            run = get(p.job_id)
            if run is None or run.spec is None:
                continue
            run.complete = p.done
            if p.done or t - run.last_progress >= interval:
                run.last_progress = t
                self._progress(run, p.steps_done, p.images_done, p.image_steps, batch)

    def _progress(self, run: LiveJob, steps_done: int, images_done: int,
                  image_steps: list[int], batch: Batch) -> None:
        """A progress event, and the same progress in RQ's job meta: written with the
        event, or, for the job's last (every image computed), both with its success (no
        reader tells the two apart: the job is `started` until then either way)."""
        assert run.spec is not None
        total = run.spec.total_steps
        fields = {"progress": round(steps_done / total, 4), "steps_done": steps_done,
                  "images_done": images_done, "image_steps": image_steps}
        try:    # RQ's job meta
            if run.complete:
                self.rq.meta_at_success(run.id, **fields)
            else:
                key, meta = self.rq.meta_update(run.id, **fields)
        except Exception as e:   # meta RQ could not read, so it cannot be written back
            self.live.fail(run, f"storing results failed: {type(e).__name__}: {e}",
                           retry=True, batch=batch)
            return
        event = Progress(steps_done=steps_done, total_steps=total, images_done=images_done,
                         num_images=run.spec.num_images, image_steps=image_steps,
                         steps_per_image=run.spec.steps_per_image)
        if run.complete:
            run.held.append(event)
            return
        batch.event(run.id, event)
        batch.hset(run.id, key, "meta", meta)

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
            if not run.complete or not self.writer.flushed(run.last_seq, run.id):
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
        ended = self.rq.ended_elsewhere([r.id for r in runs])
        with self._stop_lock:
            stop, self._stop_jobs = self._stop_jobs, set()
        for run in runs:
            if self.live.get(run.id) is None:
                continue
            if run.id in ended:
                self.live.cancel(run, ended[run.id])
            elif run.id in stop:
                self.live.fail(run, "stopped by request", retry=False, stopped=True)

    def _advertisement(self) -> dict[str, Any]:
        """What `ddpm:workers:{name}` says: the models this worker serves, and per model
        its part of the work signal (throughput.py)."""
        return {"name": self.name, "device": str(self.engine.device),
                "max_batch": self.engine.max_batch, "active_slots": self.engine.active,
                "models": [vars(m.info) for m in self.catalog.loaded.values()],
                "broken": self.catalog.broken, "draining": self.stop_requested,
                "work": self.work_meter.advertised(ready=not self.stop_requested,
                                                   broken=self.catalog.broken)}
