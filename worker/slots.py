"""A job's engine-side state (`EngineJob`) and a model's slots (`ModelSlots`: its
SlotBatch, the (job, image) of each row and each row's frame plan), with which rows are
due a frame after a step (`snapshot_due`) and their pixels (`frame_pixels`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from contract.frame_plan import FramePlan
from contract.spec import GenerationSpec
from models import to_uint8
from models.resume import SlotState

from .forward import Forward, LoadedModel
from .job_inputs import slot_specs


@dataclass
class EngineJob:
    """Engine-side state of one admitted job."""

    job_id: str
    spec: GenerationSpec
    waiting: deque[int]              # image indices not started yet (or not yet resumed)
    plan: FramePlan                  # its frames: made here, at admission, once
    held: dict[int, SlotState] = field(default_factory=dict)  # waiting ones' resume states
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
        steps, held = self.spec.steps_per_image, self.held
        return [min(steps, self.ticks - self.started_tick[i]) if i in self.started_tick
                else held[i].pos if i in held else 0 for i in range(self.spec.num_images)]


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


class ModelSlots:
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
        specs, states, every, use_xt, preview = [], [], [], [], []
        vtype = self.model.checkpoint.config.diffusion.variance_type
        for job, indices in starts:
            specs += slot_specs(job.spec, job.inputs, indices, vtype)
            states += [job.held.get(i) for i in indices]
            self.owner += [(job.job_id, i) for i in indices]
            every += [job.plan.every] * len(indices)
            use_xt += [job.plan.kind == "xt"] * len(indices)
            preview += [job.plan.preview.size] * len(indices)
        self.batch.add(specs, states)
        for job, indices in starts:
            for i in indices:
                job.held.pop(i, None)
        self.every = torch.cat([self.every, torch.tensor(every, dtype=torch.long)])
        self.use_xt = torch.cat([self.use_xt, torch.tensor(use_xt, dtype=torch.bool)])
        self.preview = torch.cat([self.preview, torch.tensor(preview, dtype=torch.long)])

    def keep(self, mask: Tensor) -> None:
        self.batch.keep(mask)
        self.owner = [o for o, k in zip(self.owner, mask.tolist(), strict=True) if k]
        self.every, self.use_xt = self.every[mask], self.use_xt[mask]
        self.preview = self.preview[mask]
