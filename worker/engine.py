"""Continuous batching of generation jobs: torch only, no Redis.

One slot is one image of one job. Every `step` first fills free slots from the images
still waiting (the job with the fewest running images first, so a 1-image request that
arrives while a big one runs starts at the next step), then runs one UNet forward per
model over all of that model's active slots, each at its own timestep with its own
sampler, and reports the frames that are due: snapshots every k steps and final images.

Between two steps a job's exact state can be taken out (`export`: per image done, running
with its slot state, or not started) and continued by another engine (`admit(...,
resume=)`), in another process or on another device: the same frames come out from there
on, bit for bit (tests/worker/test_resume_state.py); worker/resume.py is its codec.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from contract.frame_plan import FramePlan
from contract.spec import GenerationSpec
from models.resume import SlotState

from .forward import Forward, LoadedModel
from .job_inputs import conditioning, input_tensor, input_tensors, slot_specs
from .resume import JobResume
from .slots import EngineJob, ModelSlots, frame_pixels, snapshot_due

__all__ = ["Engine", "EngineJob", "Forward", "Frame", "JobProgress", "JobResume", "LoadedModel",
           "StepOutOfMemory", "StepReport", "conditioning", "frame_pixels", "input_tensor",
           "input_tensors", "slot_specs", "snapshot_due"]

if TYPE_CHECKING:
    from .settings import Admission


@dataclass(frozen=True)
class Frame:
    """Pixels of one image of one job: a snapshot (`final=False`) or the final image."""

    job_id: str
    index: int
    step: int                        # steps this image has completed
    pixels: Tensor                   # `[H x W x C]` uint8 on the CPU
    final: bool
    plan: FramePlan | None = None    # its job's frame plan (None: made outside an engine)


class JobProgress:
    """Where one job stands after a step: what the loop reports, without reading the
    engine's own state. `image_steps` is computed only when asked (the loop asks only for
    the progress events it sends: a record per job per step must stay cheap)."""

    __slots__ = ("_job", "done", "images_done", "job_id", "steps_done")

    def __init__(self, job: EngineJob) -> None:
        self._job = job
        self.job_id = job.job_id
        self.steps_done = job.steps_done        # summed over the job's images
        self.images_done = job.finished
        self.done = job.done                    # every image is final; the job left

    @property
    def image_steps(self) -> list[int]:
        """Steps each image has completed."""
        return self._job.image_steps()


@dataclass
class StepReport:
    frames: list[Frame] = field(default_factory=list)
    progress: list[JobProgress] = field(default_factory=list)   # jobs whose step count moved
    slots: dict[str, int] = field(default_factory=dict)             # model → slots stepped
    forward_seconds: dict[str, float] = field(default_factory=dict)  # model → step time

    @property
    def progressed(self) -> list[str]:
        return [p.job_id for p in self.progress]

    @property
    def completed(self) -> list[str]:
        """Jobs whose every image is final."""
        return [p.job_id for p in self.progress if p.done]


class StepOutOfMemory(torch.OutOfMemoryError):
    """Models out of memory at a forward of one row: what the step did for the others."""

    def __init__(self, report: StepReport, failed: dict[str, torch.OutOfMemoryError]) -> None:
        super().__init__("; ".join(f"{m}: {e}" for m, e in failed.items()))
        self.report = report
        self.failed = failed


class Engine:
    """Slots of every resident model, admitted and retired between any two steps."""

    def __init__(self, models: Mapping[str, LoadedModel], *, device: torch.device | str,
                 max_batch: int, bf16: bool = True, channels_last: bool = True,
                 on_oom: Callable[[str, int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.device = torch.device(device)
        self.models = dict(models)
        self.max_batch = max_batch
        self.jobs: dict[str, EngineJob] = {}
        self._batches = {name: ModelSlots(m, self.device, bf16=bf16, channels_last=channels_last)
                         for name, m in self.models.items()}
        self._on_oom = on_oom
        self._resuming: set[str] = set()      # jobs holding resume states not yet in a slot

    # -- occupancy -------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Slots running now."""
        return sum(len(b) for b in self._batches.values())

    @property
    def waiting(self) -> int:
        """Images admitted but not started."""
        return sum(len(j.waiting) for j in self.jobs.values())

    @property
    def room(self) -> int:
        """Slots not yet promised to an admitted image: how many more 1-image jobs to take."""
        return max(0, self.max_batch - self.active - self.waiting)

    def has_room(self, admission: Admission = "step") -> bool:
        """Whether another job should be taken: everything admitted fits in a batch; under
        `request` admission, only into an empty engine (a batch then runs to completion
        with the jobs it started with: worker.settings.ADMISSIONS)."""
        if admission == "request" and self.busy:
            return False
        return self.room > 0

    @property
    def remaining_image_steps(self) -> dict[str, int]:
        """Per served model, image-steps still to compute: every admitted image not yet
        final, waiting ones included (the work signal; read by the heartbeat thread: one
        copy of the job list, plain ints)."""
        out = dict.fromkeys(self.models, 0)
        for job in list(self.jobs.values()):
            out[job.spec.model] += job.spec.total_steps - job.steps_done
        return out

    @property
    def busy(self) -> bool:
        """Whether any admitted job has images left to compute."""
        return bool(self.jobs)

    # -- jobs ------------------------------------------------------------------------

    def admit(self, job_id: str, spec: GenerationSpec, inputs: dict[str, Tensor] | None = None,
              *, resume: JobResume | None = None) -> EngineJob:
        """Queue a job's images for slots (`inputs`: its input images, `input_tensors`);
        ValueError (naming the field) if it cannot run. With `resume` (`export`'s, maybe
        from another engine) it goes on from there: done images are not redone, running
        ones continue at their step before any image starts, progress and frames continue
        as if uninterrupted; ValueError if the state cannot continue this job."""
        if job_id in self.jobs:
            raise ValueError(f"job {job_id} is already running")
        model = self.models.get(spec.model)
        if model is None:
            raise ValueError(f"model: {spec.model!r} is not served by this worker")
        spec.check_model(model.info)
        missing = set(spec.inputs) - set(inputs or {})
        if missing:
            raise ValueError(f"{sorted(missing)[0]}: the job's input image was not given")
        job = EngineJob(job_id=job_id, spec=spec, waiting=deque(range(spec.num_images)),
                        plan=FramePlan.of(spec, model.info.image_size),
                        inputs={k: v.to(self.device) for k, v in (inputs or {}).items()})
        if resume is not None:
            self._resume(job, model, resume)
        self.jobs[job_id] = job
        return job

    def _resume(self, job: EngineJob, model: LoadedModel, state: JobResume) -> None:
        state.check(job.spec.num_images)
        held = sorted(state.running)
        vtype = model.checkpoint.config.diffusion.variance_type
        # The batch's own checks, on a scratch CPU batch: a state that cannot continue its
        # slot is refused here, not at a later step.
        model.checkpoint.slot_batch("cpu").add(
            slot_specs(job.spec, job.inputs, held, vtype), [state.running[i] for i in held])
        spi = job.spec.steps_per_image
        job.held = {i: state.running[i] for i in held}
        job.waiting = deque(held + [i for i in job.waiting if i not in job.held
                                    and i not in state.done])
        job.finished = len(state.done)
        job.steps_done = state.steps_done(spi)
        job.started_tick = dict.fromkeys(state.done, -spi)   # image_steps: spi each
        if held:
            self._resuming.add(job.job_id)

    def export(self, job_id: str) -> JobResume:
        """The job's resume state now, between two steps (KeyError if it is not here)."""
        return self.exports([job_id])[job_id]

    def exports(self, job_ids: list[str]) -> dict[str, JobResume]:
        """Resume states of these jobs (KeyError for one not here), with one copy to the
        host per model: what a drain writes for every running job at once."""
        by_model: dict[str, list[str]] = {}
        for job_id in job_ids:
            by_model.setdefault(self.jobs[job_id].spec.model, []).append(job_id)
        out = {}
        for model, ids in by_model.items():
            mb, want = self._batches[model], set(ids)
            rows = [r for r, (j, _) in enumerate(mb.owner) if j in want]
            running: dict[str, dict[int, SlotState]] = {j: {} for j in ids}
            for r, st in zip(rows, mb.batch.export(rows) if rows else [], strict=True):
                job_id, index = mb.owner[r]
                running[job_id][index] = st
            for job_id in ids:
                job = self.jobs[job_id]
                running[job_id].update(job.held)
                done = set(range(job.spec.num_images)) - set(running[job_id]) - set(job.waiting)
                out[job_id] = JobResume(done=frozenset(done), running=running[job_id])
        return {job_id: out[job_id] for job_id in job_ids}      # in the order asked

    def cancel(self, job_id: str) -> bool:
        """Drop a job and free its slots now; False if it was not here."""
        job = self.jobs.pop(job_id, None)
        self._resuming.discard(job_id)
        if job is None:
            return False
        mb = self._batches[job.spec.model]
        if job.running:
            mb.keep(torch.tensor([o[0] != job_id for o in mb.owner], dtype=torch.bool))
        return True

    # -- the step --------------------------------------------------------------------

    def _fill(self) -> None:
        """Give free slots to waiting images, fewest-running job first (then oldest)."""
        free = self.max_batch - self.active
        starts: dict[str, list[int]] = {}
        if self._resuming:                    # resumed slots first: they were running
            for job in [j for j in self.jobs.values() if j.job_id in self._resuming]:
                while free > 0 and job.waiting and job.waiting[0] in job.held:
                    starts.setdefault(job.job_id, []).append(job.waiting.popleft())
                    job.running += 1
                    free -= 1
                if not job.waiting or job.waiting[0] not in job.held:
                    self._resuming.discard(job.job_id)
        ready = [(j.running, j.admitted_at, k, j) for k, j in enumerate(self.jobs.values())
                 if j.waiting]
        heapq.heapify(ready)
        while free > 0 and ready:
            _, admitted, k, job = heapq.heappop(ready)
            starts.setdefault(job.job_id, []).append(job.waiting.popleft())
            job.running += 1
            free -= 1
            if job.waiting:
                heapq.heappush(ready, (job.running, admitted, k, job))
        by_model: dict[str, list[tuple[EngineJob, list[int]]]] = {}
        for job_id, indices in starts.items():
            job = self.jobs[job_id]
            job.started_tick.update({i: job.ticks - (job.held[i].pos if i in job.held else 0)
                                     for i in indices})
            by_model.setdefault(job.spec.model, []).append((job, indices))
        for model, model_starts in by_model.items():
            self._batches[model].add(model_starts)

    def step(self) -> StepReport:
        """Admit waiting images into free slots, then advance every model's batch one step.

        A model out of memory even one row at a time does not stop the others: they step,
        and then `StepOutOfMemory` carries their report and the model that failed."""
        self._fill()
        report = StepReport()
        failed: dict[str, torch.OutOfMemoryError] = {}
        for name, mb in self._batches.items():
            if len(mb):
                try:
                    self._step_model(mb, report)
                except torch.OutOfMemoryError as e:
                    failed[name] = e
        if failed:
            raise StepOutOfMemory(report, failed)
        return report

    def jobs_of(self, model: str) -> list[str]:
        """Ids of the admitted jobs of `model`."""
        return [j.job_id for j in self.jobs.values() if j.spec.model == model]

    def _step_model(self, mb: ModelSlots, report: StepReport) -> None:
        # Host time, with no device sync: the next step's Python overlaps this step's kernels,
        # and in steady state the launch queue makes this track the GPU's time per step.
        t0 = time.perf_counter()
        out = self._step_with_oom_retry(mb)
        name = mb.model.name
        report.forward_seconds[name] = time.perf_counter() - t0
        report.slots[name] = len(mb)

        steps, finished = out.steps_done, out.finished
        emit = torch.nonzero(snapshot_due(steps, mb.every, finished) | finished).flatten()
        if len(emit):
            rows = emit.to(self.device)
            use_xt = (mb.use_xt | finished)[emit].to(self.device).view(-1, 1, 1, 1)
            sizes = torch.where(finished, mb.model.info.image_size, mb.preview)[emit]
            pixels = frame_pixels(torch.where(use_xt, out.x_t[rows], out.x0[rows]),
                                  sizes.tolist())
            for k, row in enumerate(emit.tolist()):
                job_id, index = mb.owner[row]
                report.frames.append(Frame(job_id, index, int(steps[row]), pixels[k],
                                           final=bool(finished[row]),
                                           plan=self.jobs[job_id].plan))

        stepped = [j for j in self.jobs.values() if j.running and j.spec.model == name]
        for job in stepped:                  # a job's rows in this batch = its running images
            job.steps_done += job.running
            job.ticks += 1
        for row in torch.nonzero(finished).flatten().tolist():
            job = self.jobs[mb.owner[row][0]]
            job.running -= 1
            job.finished += 1
        if bool(finished.any()):
            mb.keep(~finished)
        for job in stepped:
            report.progress.append(JobProgress(job))
            if job.done:
                self.jobs.pop(job.job_id, None)

    def _step_with_oom_retry(self, mb: ModelSlots):  # type: ignore[no-untyped-def]
        """Step; on out-of-memory halve the forward chunk and step again (jobs are kept)."""
        while True:
            try:
                return mb.batch.step()
            except torch.OutOfMemoryError:
                fwd = mb.forward
                size = fwd.chunk or fwd.last_rows
                if size <= 1:
                    raise
                fwd.chunk = max(1, size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self._on_oom:
                    self._on_oom(mb.model.name, fwd.chunk)
