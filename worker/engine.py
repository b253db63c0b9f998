"""Continuous batching of generation jobs: torch only, no Redis.

One slot is one image of one job. Every `step` first fills free slots from the images
still waiting (the job with the fewest running images first, so a 1-image request that
arrives while a big one runs starts at the next step), then runs one UNet forward per
model over all of that model's active slots, each at its own timestep with its own
sampler, and reports the frames that are due: snapshots every k steps and final images.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from contract.frame_plan import FramePlan
from contract.spec import GenerationSpec, ModelInfo
from models import Checkpoint, SlotSpec, sampler_kind, to_uint8

from .forward import Forward
from .job_inputs import conditioning, input_tensor, input_tensors

__all__ = ["Engine", "EngineJob", "Forward", "Frame", "JobProgress", "LoadedModel",
           "StepOutOfMemory", "StepReport", "conditioning", "frame_pixels", "input_tensor",
           "input_tensors", "snapshot_due"]

if TYPE_CHECKING:
    from .settings import Admission


@dataclass
class LoadedModel:
    """A resident model: the network on its device and what the worker advertises."""

    name: str
    checkpoint: Checkpoint
    info: ModelInfo
    load_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, name: str, ckpt: Checkpoint, load_seconds: float) -> LoadedModel:
        u, d = ckpt.config.unet, ckpt.config.diffusion
        info = ModelInfo(name=name, image_size=u.image_size, in_channels=u.in_channels,
                         num_timesteps=d.num_timesteps, num_classes=u.num_classes,
                         class_names=list(ckpt.config.class_names),
                         parameters=sum(p.numel() for p in ckpt.net.parameters()))
        return cls(name=name, checkpoint=ckpt, info=info, load_seconds=load_seconds)


@dataclass
class EngineJob:
    """Engine-side state of one admitted job."""

    job_id: str
    spec: GenerationSpec
    waiting: deque[int]              # image indices not started yet
    plan: FramePlan                  # its frames: made here, at admission, once
    inputs: dict[str, Tensor] = field(default_factory=dict)   # input_tensors(...)
    running: int = 0
    finished: int = 0
    steps_done: int = 0              # summed over the job's images
    ticks: int = 0                   # engine steps this job has been stepped in
    started_tick: dict[int, int] = field(default_factory=dict)   # image → `ticks` at its start
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def total_steps(self) -> int:
        return self.spec.total_steps

    @property
    def done(self) -> bool:
        return self.finished == self.spec.num_images

    def image_steps(self) -> list[int]:
        """Steps each image has completed. Every running image of a model advances once per
        engine step, so a start tick per image is enough: no per-row bookkeeping per step."""
        steps = self.spec.steps_per_image
        return [min(steps, self.ticks - self.started_tick[i]) if i in self.started_tick else 0
                for i in range(self.spec.num_images)]


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


def slot_specs(s: GenerationSpec, inputs: Mapping[str, Tensor], indices: list[int],
               variance_type: str) -> list[SlotSpec]:
    """The slots of these images of a request (`inputs`: its input images as model-space
    tensors): the worker's jobs and `ddpm sample` make their slots here alike."""
    kind = sampler_kind(s.sampler, variance_type)  # type: ignore[arg-type]
    return [SlotSpec(seed=s.seed, steps=s.steps, kind=kind, eta=s.eta, label=s.class_label,
                     guidance=s.guidance_scale,
                     **conditioning(inputs, i, s.num_images, strength=s.effective_strength,
                                    jump_length=s.jump_length, jump_n_sample=s.jump_n_sample))
            for i in indices]


def snapshot_due(steps: Tensor, every: Tensor, finished: Tensor) -> Tensor:
    """Rows due a snapshot after this step: `FramePlan.snapshot_at`, row-wise (`steps`:
    each row's steps done, `every`: its plan's period, 0 = none; a finished row makes its
    final image instead). tests/worker/test_engine.py ties the two."""
    return (every > 0) & (steps % every.clamp(min=1) == 0) & ~finished


def frame_pixels(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """Rows of `x` (`[N x C x H x W]` in model space) as uint8 `[s x s x C]` CPU pixels,
    row k at side `sizes[k]`: downscaled on the device (area: the mean of each block), so a
    preview costs its own pixels, not the image's, from the copy to the host onwards."""
    full = x.shape[-1]
    out: list[Tensor] = [x] * len(sizes)
    for side in set(sizes):
        rows = [k for k, s in enumerate(sizes) if s == side]
        sel = x if len(rows) == len(sizes) else x[rows]
        if side != full:
            sel = F.interpolate(sel, size=(side, side), mode="area")
        for k, px in zip(rows, to_uint8(sel), strict=True):
            out[k] = px
    return out


class _ModelBatch:
    """A model's SlotBatch plus which (job, image) each row belongs to."""

    def __init__(self, model: LoadedModel, device: torch.device, *, bf16: bool,
                 channels_last: bool) -> None:
        ckpt = model.checkpoint
        self.model = model
        self.forward = Forward(ckpt.net, device, bf16=bf16, channels_last=channels_last)
        self.batch = ckpt.slot_batch(device, net=self.forward)
        self.owner: list[tuple[str, int]] = []              # row → (job id, image index)
        self.every = torch.empty(0, dtype=torch.long)       # row → snapshot period (0 = none)
        self.use_xt = torch.empty(0, dtype=torch.bool)      # row → snapshot x_t instead of x̂0
        self.preview = torch.empty(0, dtype=torch.long)     # row → snapshot side in pixels

    def __len__(self) -> int:
        return len(self.owner)

    def add(self, starts: list[tuple[EngineJob, list[int]]]) -> None:
        """Start these images of these jobs: one append to the batch for all of them."""
        specs, every, use_xt, preview = [], [], [], []
        vtype = self.model.checkpoint.config.diffusion.variance_type
        for job, indices in starts:
            specs += slot_specs(job.spec, job.inputs, indices, vtype)
            self.owner += [(job.job_id, i) for i in indices]
            every += [job.plan.every] * len(indices)
            use_xt += [job.plan.kind == "xt"] * len(indices)
            preview += [job.plan.preview.size] * len(indices)
        self.batch.add(specs)
        self.every = torch.cat([self.every, torch.tensor(every, dtype=torch.long)])
        self.use_xt = torch.cat([self.use_xt, torch.tensor(use_xt, dtype=torch.bool)])
        self.preview = torch.cat([self.preview, torch.tensor(preview, dtype=torch.long)])

    def keep(self, mask: Tensor) -> None:
        self.batch.keep(mask)
        self.owner = [o for o, k in zip(self.owner, mask.tolist(), strict=True) if k]
        self.every, self.use_xt = self.every[mask], self.use_xt[mask]
        self.preview = self.preview[mask]


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
        self._batches = {name: _ModelBatch(m, self.device, bf16=bf16, channels_last=channels_last)
                         for name, m in self.models.items()}
        self._on_oom = on_oom

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
    def busy(self) -> bool:
        """Whether any admitted job has images left to compute."""
        return bool(self.jobs)

    # -- jobs ------------------------------------------------------------------------

    def admit(self, job_id: str, spec: GenerationSpec,
              inputs: dict[str, Tensor] | None = None) -> EngineJob:
        """Queue a job's images for slots (`inputs`: its input images, `input_tensors`);
        ValueError (naming the field) if it cannot run."""
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
        self.jobs[job_id] = job
        return job

    def cancel(self, job_id: str) -> bool:
        """Drop a job and free its slots now; False if it was not here."""
        job = self.jobs.pop(job_id, None)
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
            job.started_tick.update(dict.fromkeys(indices, job.ticks))
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

    def _step_model(self, mb: _ModelBatch, report: StepReport) -> None:
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

    def _step_with_oom_retry(self, mb: _ModelBatch):  # type: ignore[no-untyped-def]
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
