"""Zero lost work: a stopping worker's jobs, and checkpoints, go on from their exact state.

A drain (SIGTERM, RQ's shutdown command, a second signal or the grace period) happens
between two steps: every running job's state (`Engine.exports`, one host copy per model)
is encoded (worker/resume.py), and once the frames of the steps it stands for are in
Redis (the writer caught up), the states are stored and the jobs put back at their
queues' front in one round-trip (`RqSide.requeue_many`). Whichever worker takes a job
next continues it from there (admission.py reads `keys.resume_key(job)` with its inputs).

A checkpoint (`DDPM_RESUME_EVERY` N steps) writes the state of every job with more than N
steps left through the ordered writer, in the same batch as (and after) that step's
frames: one script run, so a state never stands for a frame Redis does not have. A job
whose worker is SIGKILLed is re-queued by RQ's maintenance (its Retry) and continues from
its last checkpoint; a final image stored before the cut is not computed again.

A job whose state could exceed `DDPM_RESUME_MAX_BYTES` writes none: it restarts from step
0, as before resume existed, and its `requeued` event says so (no `saved_at`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from contract.events import Requeued
from contract.keys import cost_key, resume_key
from contract.resume import state_bytes

from .engine import Engine
from .events import Batch, EventWriter
from .live import LiveJob, LiveJobs
from .metrics import WorkerMetrics
from .resume import JobResume, encode
from .rqside import RqSide
from .settings import WorkerSettings

log = logging.getLogger("ddpm.worker")


class Resumer:
    """Writes running jobs' resume states: on drain, and every N steps."""

    def __init__(self, rq: RqSide, engine: Engine, live: LiveJobs, writer: EventWriter,
                 metrics: WorkerMetrics, settings: WorkerSettings) -> None:
        self.rq = rq
        self.engine = engine
        self.live = live
        self.writer = writer
        self.metrics = metrics
        self.settings = settings
        self._steps = 0         # steps this worker has run (checkpoints every N of them)

    # -- what is left, and the bytes ---------------------------------------------------

    def steps_left(self, run: LiveJob) -> int:
        """Network steps the job still needs, over all its images (0: not in the engine)."""
        job = self.engine.jobs.get(run.id)
        return 0 if job is None else job.spec.total_steps - job.steps_done

    def fits(self, run: LiveJob) -> bool:
        """Whether the job's state is within DDPM_RESUME_MAX_BYTES (known from its spec)."""
        spec = run.spec
        model = self.engine.models.get(spec.model) if spec is not None else None
        if spec is None or model is None:
            return False
        return state_bytes(spec, model.info, running=self.engine.max_batch) \
            <= self.settings.resume_max_bytes

    def _values(self, runs: list[LiveJob]) -> dict[str, tuple[bytes, int]]:
        """job → (its encoded state, steps done) for the jobs with steps behind them whose
        state fits the bound."""
        runs = [r for r in runs if r.id in self.engine.jobs and self.fits(r)]
        out: dict[str, tuple[bytes, int]] = {}
        for job_id, state in self.engine.exports([r.id for r in runs]).items():
            run = self.live.get(job_id)
            assert run is not None and run.spec is not None
            done = state.steps_done(run.spec.steps_per_image)
            if done == 0 or len(state.done) == run.spec.num_images:
                continue
            data = self._encode(run, state)
            if data is not None:
                out[job_id] = (data, done)
        return out

    def _encode(self, run: LiveJob, state: JobResume) -> bytes | None:
        assert run.spec is not None
        data = encode(state, run.spec, self.engine.models[run.spec.model].info)
        return data if len(data) <= self.settings.resume_max_bytes else None

    # -- checkpoints -------------------------------------------------------------------

    def stepped(self, batch: Batch) -> None:
        """After a step whose frames are in `batch`: every `resume_every` steps, the state
        of each job with more than that many steps left goes into the batch, after them."""
        every = self.settings.resume_every
        self._steps += 1
        if every <= 0 or self._steps % every:
            return
        long = [r for r in self.live if not r.complete and self.steps_left(r) > every]
        if not long:
            return
        t = time.perf_counter()
        values = self._values(long)
        for job_id, (data, done) in values.items():
            batch.value(job_id, resume_key(job_id), data, self.settings.result_ttl)
            run = self.live.get(job_id)
            if run is not None and run.spec is not None:
                run.saved = True        # and what a re-queue would leave (contract/work.py):
                batch.value(job_id, cost_key(job_id), str(run.spec.total_steps - done).encode(),
                            self.settings.result_ttl)
        self.metrics.resume_writes.labels("checkpoint").inc(len(values))
        self.metrics.resume_seconds.observe(time.perf_counter() - t)

    # -- drain ---------------------------------------------------------------------------

    def drain_now(self, *, past_grace: bool) -> list[LiveJob]:
        """The running jobs to drain now: all of them past the grace period, else those
        more than `drain_finish_steps` steps from done (the others finish here)."""
        near = self.settings.drain_finish_steps
        return [r for r in self.live if r.spec is not None and not r.complete
                and (past_grace or self.steps_left(r) > near)]

    def drain(self, runs: list[LiveJob], until: Callable[[], bool]) -> None:
        """Store these jobs' states and put them back at their queues' front, in one
        round-trip once the writer has their frames in Redis; without it (Redis gone past
        `until`), each goes back with the state it had (a checkpoint, or none: step 0)."""
        if not runs:
            return
        values = self._values(runs)
        while not self.writer.wait_until_caught_up(timeout=0.1):
            if until():
                log.warning("drain: frames not all written; %d jobs go back without a "
                            "new resume state", len(runs))
                values = {}
                break
        ids = [r.id for r in runs]
        stored = {resume_key(j): v[0] for j, v in values.items()}
        for run in runs:    # what each has left, for the work signal (contract/work.py)
            assert run.spec is not None
            left = run.spec.total_steps - (values[run.id][1] if run.id in values else 0)
            stored[cost_key(run.id)] = str(left).encode()
        self.rq.requeue_many(ids, stored, self.settings.result_ttl)
        self.metrics.resume_writes.labels("drain").inc(len(values))
        for run in runs:
            saved = values[run.id][1] if run.id in values else None
            self.live.forget(run)
            self.writer.event(run.id, Requeued(worker=self.rq.name, saved_at=saved))
            self.metrics.jobs.labels("requeued").inc()
            if saved is None:
                log.info("job %s re-queued without a resume state (restarts from step 0)",
                         run.id)
            else:
                log.info("job %s re-queued with its state at step %d", run.id, saved)
