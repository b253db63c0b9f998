"""Taking jobs into the engine: as many as it has room for, started in one round-trip.

Each admitted job is marked started through the RQ side (RqSide.start), read as a request
spec, given its stored input images (one MGET for all) and admitted into the engine; a job
that cannot run fails alone, with the reason. When idle, the loop blocks on the wake token
each enqueue pushes (contract.wake_commands: no blocking pop exists for several lists).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

from contract import tracing
from contract.events import Error, Started
from contract.keys import WAKE_TIMEOUT, input_key, resume_key, wake_key
from contract.redis_errors import redis_full

from .catalog import Catalog
from .engine import Engine, input_tensors
from .events import Batch, EventWriter
from .live import JobError, LiveJob, LiveJobs, parse_spec
from .metrics import WorkerMetrics
from .resume import JobResume, ResumeStateError, decode
from .rqside import RqSide, Unstartable
from .settings import WorkerSettings

log = logging.getLogger("ddpm.worker")

# Seconds a busy worker lets pass between two looks for a wake token. Every look is a
# round-trip, the most of all a worker makes for small jobs, and costs Redis ~10 µs of
# CPU (the command's own work is ~1 µs); a pass of a small model lasts a few ms or less.
# A job enqueued meanwhile waits this long at most before it joins the batch.
WAKE_CHECK = 0.005


class Admission:
    """Takes and starts jobs for one worker's loop."""

    def __init__(self, redis: Redis, rq: RqSide, engine: Engine, live: LiveJobs,
                 writer: EventWriter, catalog: Catalog, metrics: WorkerMetrics,
                 settings: WorkerSettings, on_full: Callable[[], None]) -> None:
        self.redis = redis
        self.rq = rq
        self.engine = engine
        self.live = live
        self.writer = writer
        self.catalog = catalog
        self.metrics = metrics
        self.settings = settings
        self._on_full = on_full
        self._wake_keys = tuple(wake_key(m) for m in catalog.names)
        self._traced = tracing.enabled()    # DDPM_OTLP_ENDPOINT (contract/tracing.py)
        self.unstarted: list[str] = []      # taken as Redis went away: to put back

    def put_back_unstarted(self) -> None:
        while self.unstarted:
            job_id = self.unstarted[0]
            self.rq.put_back(job_id)
            self.unstarted.pop(0)
            log.warning("job %s put back after a Redis error", job_id)

    def admit(self, batch: Batch, *, block: bool, stopping: Callable[[], bool]) -> bool:
        """Take as many jobs as the engine has room for (every job has at least one image);
        with `block`, wait up to 1 s for one, woken by an enqueue's token."""
        deadline = time.monotonic() + (1.0 if block else 0.0)
        took = False
        woken = block           # idle: look at the queues now, then wait for a token
        while self.engine.has_room(self.settings.admission) and not stopping():
            try:
                taken, bad = self.rq.take(self.engine.room, self._wake_keys,
                                          poll=0.0 if woken else WAKE_TIMEOUT,
                                          check=0.0 if woken else WAKE_CHECK)
            except RedisError as e:
                if redis_full(e):
                    self._on_full()
                else:
                    log.error("dequeue failed: %s; retrying", e)
                time.sleep(1)
                return took
            for b in bad:
                self._fail_unreadable(b)
            if taken:
                self.start(taken, batch)
                took = True
                continue
            if bad:
                continue
            left = deadline - time.monotonic()
            if took or stopping() or left <= 0:
                return took
            # A token (or WAKE_TIMEOUT, for jobs of plain RQ): look at the queues again.
            self.redis.blpop(list(self._wake_keys), timeout=max(0.01, min(left, WAKE_TIMEOUT)))
            woken = True
        return took

    def start(self, taken: list[str], batch: Batch | None = None) -> None:
        """Mark `taken` started and admit each into the engine; a job that cannot run fails
        alone, with the reason. Without `batch`, its events are sent here."""
        try:
            started, canceled = self.rq.start(taken)
        except RedisError:
            self.unstarted.extend(taken)    # in no queue and no registry: put back
            raise
        for job_id in canceled:
            self.live.canceled_before_start(job_id)
        own = batch if batch is not None else Batch()
        runs: list[LiveJob] = []
        ran_before = {s.job_id for s in started if s.ran_before}
        for s in started:
            run = LiveJob(id=s.job_id, queue_wait=s.queue_wait)
            if self._traced:        # its `queue` span (ended: enqueued → now) and `job` span
                taken = time.time_ns()
                run.span = tracing.start_job(
                    s.trace, enqueued_ns=taken - int(s.queue_wait * 1e9), taken_ns=taken,
                    attributes={"ddpm.job_id": s.job_id, "ddpm.worker": self.rq.name})
            self.metrics.queue_wait.observe(run.queue_wait, tracing.exemplar(run.span))
            self.live.add(run)
            try:
                run.spec = parse_spec(s.spec, s.error)
                if run.spec.model in self.catalog.broken:
                    raise JobError(self.catalog.broken[run.spec.model])
            except JobError as e:
                self.live.fail(run, str(e), retry=False)
                continue
            runs.append(run)
        try:
            pngs, states = self._stored(runs, ran_before)
        except RedisError as e:             # RQ's Retry brings them back
            for run in [r for r in runs if r.spec and r.spec.inputs]:
                runs.remove(run)
                self.live.fail(run, f"input images could not be read: {e}", retry=True)
            for run in runs:                # step 0 (the same images); any state goes
                run.saved = True            # when it succeeds
            pngs, states = {}, {}
        for run in runs:
            spec = run.spec
            assert spec is not None
            try:
                model = self.engine.models.get(spec.model)
                inputs = input_tensors(spec, pngs.get(run.id, {}), model.info) \
                    if model is not None else None
                resume = self._resume_state(run, states.get(run.id), own)
                try:
                    job = self.engine.admit(run.id, spec, inputs, resume=resume)
                except ValueError:
                    if resume is None:
                        raise                               # not served, or bad inputs
                    self._refuse_state(run, "the engine refused it", own)
                    resume = None
                    job = self.engine.admit(run.id, spec, inputs)
            except ValueError as e:
                self.live.fail(run, str(e), retry=False)
                continue
            if self.writer.store is not None:       # the inputs it saw: to the store too
                for name, png in pngs.get(run.id, {}).items():
                    if png is not None:
                        own.input(run.id, name, png)
            resumed_at = None if resume is None else resume.steps_done(spec.steps_per_image)
            own.event(run.id, Started(worker=self.rq.name, model=spec.model,
                                      num_images=spec.num_images,
                                      steps_per_image=job.plan.steps_per_image,
                                      queue_wait_s=round(run.queue_wait, 3),
                                      resumed_at=resumed_at))
            log.info("job %s started: %s ×%d, %s %d steps%s%s", run.id, spec.model,
                     spec.num_images, spec.sampler, spec.steps,
                     "" if resumed_at is None else f", resumed at step {resumed_at}",
                     run.traced)
        if batch is None:
            self.live.send(own)

    def _stored(self, runs: list[LiveJob], ran_before: set[str]
                ) -> tuple[dict[str, dict[str, bytes | None]], dict[str, bytes]]:
        """The stored input images of these jobs (job → field → PNG) and the resume states
        (job → bytes, worker/drain.py) of those that ran before (no other has one): one
        MGET for all, none when no job has either (a fresh job without input images)."""
        wanted = [(run.id, f) for run in runs if run.spec for f in run.spec.inputs]
        ids = [run.id for run in runs if run.id in ran_before]
        if not ids and not wanted:
            return {}, {}
        found = self.redis.mget([input_key(job_id, f) for job_id, f in wanted]
                                + [resume_key(job_id) for job_id in ids])
        out: dict[str, dict[str, bytes | None]] = {}
        for (job_id, f), png in zip(wanted, found, strict=False):
            out.setdefault(job_id, {})[f] = png
        states = {job_id: data for job_id, data in zip(ids, found[len(wanted):], strict=True)
                  if data is not None}
        return out, states

    def _resume_state(self, run: LiveJob, data: bytes | None, batch: Batch) -> JobResume | None:
        """The job's stored state, if it has one this job on this model can continue from;
        one it cannot (another model or request, damaged) is deleted: step 0."""
        if data is None:
            return None
        run.saved = True
        spec = run.spec
        assert spec is not None
        model = self.engine.models.get(spec.model)
        if model is None:
            return None
        try:
            state = decode(data, spec, model.info)
        except ResumeStateError as e:
            self._refuse_state(run, str(e), batch)
            return None
        self.metrics.resumed.labels("resumed").inc()
        return state

    def _refuse_state(self, run: LiveJob, why: str, batch: Batch) -> None:
        log.warning("job %s: its resume state is not used (%s); it starts from step 0",
                    run.id, why)
        self.metrics.resumed.labels("refused").inc()
        batch.value(run.id, resume_key(run.id), None, 0)

    def _fail_unreadable(self, bad: Unstartable) -> None:
        message = f"job cannot be read: {bad.reason}"
        log.warning("job %s failed: %s", bad.job_id, message)
        self.rq.fail_unreadable(bad)
        self.writer.event(bad.job_id, Error(message=message))
        self.metrics.jobs.labels("failed").inc()
