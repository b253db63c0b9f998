"""A batch of independent sampling trajectories ("slots") advanced one step at a time.

Each slot is one image: its own timestep plan (step count), sampler, η, label, guidance
scale and random generator. `step` runs one network forward for every slot, whatever its
timestep, then each slot's own update. Slots can be added and removed between any two
steps, which is what a continuous-batching server needs; the offline sampler uses the same
class, so there is one code path for sampling.

Host-side state (plans, positions, coefficients) stays on the CPU so that no step has to
wait for the device to decide what to do next.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .samplers import SamplerKind, apply_step, guided_eps, step_coefficients
from .schedule import Schedule, spaced_timesteps
from .seeding import counter_normal, image_seed


@dataclass(frozen=True)
class SlotSpec:
    """What one image asks for."""

    seed: int
    index: int = 0                      # image number within its request
    steps: int = 50
    kind: SamplerKind = SamplerKind.DDIM
    eta: float = 0.0                    # DDIM only
    label: int | None = None            # class for conditional models; None = unconditional
    guidance: float = 1.0               # classifier-free guidance scale (1 = none)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be finite, got {self.guidance}")


@dataclass
class StepOutput:
    """What one `step` produced, row-aligned with the batch before retirement."""

    x_t: Tensor        # `[N x C x H x W]` after the step (x at each slot's t_next)
    x0: Tensor         # `[N x C x H x W]` this step's prediction of the clean image
    steps_done: Tensor  # `[N]` long, host: steps each slot has completed
    finished: Tensor   # `[N]` bool, host: slots that reached the clean image


class SlotBatch:
    """Trajectories at arbitrary points of their own plans, stepped together."""

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: Schedule,
        *,
        shape: tuple[int, int, int],
        device: torch.device | str = "cpu",
        num_classes: int = 0,
        clip_denoised: bool = True,
    ) -> None:
        self.net = net
        self.schedule = schedule            # host tables: per-slot coefficients
        self._tables = schedule.to(device)  # device tables: x̂0 from ε
        self.shape = shape                  # (C, H, W)
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.clip_denoised = clip_denoised
        c, h, w = shape
        self.x = torch.empty((0, c, h, w), device=self.device)
        self.x0_prev = torch.empty((0, c, h, w), device=self.device)
        self.plans = torch.empty((0, 1), dtype=torch.long)   # rows: t…0 then −1 padding
        self.pos = torch.empty(0, dtype=torch.long)
        self.kind = torch.empty(0, dtype=torch.long)
        self.eta = torch.empty(0, dtype=torch.float64)
        self.labels = torch.empty(0, dtype=torch.long)
        self.guidance = torch.empty(0, dtype=torch.float64)
        self.keys = torch.empty(0, dtype=torch.long, device=self.device)  # per-image noise key

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def total_steps(self) -> Tensor:
        """`[N]` long: each slot's step count."""
        return (self.plans >= 0).sum(dim=1)

    def add(self, specs: Sequence[SlotSpec]) -> None:
        """Append slots; their x_T is drawn from each slot's own generator."""
        if not specs:
            return
        T = self.schedule.num_timesteps
        null = self.num_classes
        by_steps: dict[int, Tensor] = {}    # one plan per step count, however many slots
        for s in specs:
            if s.label is not None and not (self.num_classes and 0 <= s.label < self.num_classes):
                raise ValueError(f"label {s.label} is out of range for this model")
            if s.steps not in by_steps:
                by_steps[s.steps] = spaced_timesteps(s.steps, T)
        keys = torch.tensor([image_seed(s.seed, s.index) for s in specs], device=self.device)
        x_T = counter_normal(keys, torch.zeros_like(keys), self.shape)   # counter 0: x_T
        width = max(self.plans.shape[1], max(len(p) for p in by_steps.values()) + 1)
        padded = {n: _pad(p[None], width)[0] for n, p in by_steps.items()}
        self.plans = torch.cat([_pad(self.plans, width),
                                torch.stack([padded[s.steps] for s in specs])])
        self.x = torch.cat([self.x, x_T])
        self.x0_prev = torch.cat([self.x0_prev, torch.zeros_like(self.x[-len(specs):])])
        self.pos = torch.cat([self.pos, torch.zeros(len(specs), dtype=torch.long)])
        self.kind = torch.cat([self.kind, torch.tensor([int(s.kind) for s in specs])])
        self.eta = torch.cat([self.eta, torch.tensor([s.eta for s in specs], dtype=torch.float64)])
        labels = [null if s.label is None else s.label for s in specs]
        self.labels = torch.cat([self.labels, torch.tensor(labels, dtype=torch.long)])
        guid = [1.0 if s.label is None else s.guidance for s in specs]
        self.guidance = torch.cat([self.guidance, torch.tensor(guid, dtype=torch.float64)])
        self.keys = torch.cat([self.keys, keys])

    def keep(self, mask: Tensor) -> None:
        """Retain only the slots where the host bool `[N]` mask is true."""
        if len(mask) == len(self) and bool(mask.all()):
            return      # the common step: nobody finished, nothing to copy
        idx = torch.nonzero(mask).flatten()
        dev_idx = idx.to(self.device)
        self.x, self.x0_prev = self.x[dev_idx], self.x0_prev[dev_idx]
        self.plans, self.pos, self.kind = self.plans[idx], self.pos[idx], self.kind[idx]
        self.eta, self.labels, self.guidance = self.eta[idx], self.labels[idx], self.guidance[idx]
        self.keys = self.keys[dev_idx]
        width = int(self.total_steps.max()) + 1 if len(idx) else 1
        self.plans = self.plans[:, :width]

    @torch.no_grad()
    def step(self) -> StepOutput:
        """One network forward for all slots, then each slot's own update."""
        if len(self) == 0:
            raise ValueError("no slots to step")
        rows = torch.arange(len(self))
        t = self.plans[rows, self.pos]
        t_next = self.plans[rows, self.pos + 1]
        t_prev = torch.where(self.pos > 0, self.plans[rows, (self.pos - 1).clamp(min=0)], -1)
        coefs = step_coefficients(self.schedule, self.kind, t, t_next, t_prev, self.eta)

        t_dev = t.to(self.device, non_blocking=True)
        y = self.labels.to(self.device, non_blocking=True) if self.num_classes else None
        eps = guided_eps(self.net, self.x, t_dev, y, self.guidance,
                         self.num_classes if self.num_classes else None)
        noise = self._noise(coefs.needs_noise)
        x_next, x0 = apply_step(self._tables, self.x, eps, t_dev, coefs, x0_prev=self.x0_prev,
                                noise=noise, clip_denoised=self.clip_denoised)
        self.x, self.x0_prev = x_next, x0
        self.pos = self.pos + 1
        return StepOutput(x_t=x_next, x0=x0, steps_done=self.pos.clone(), finished=t_next < 0)

    def _noise(self, needed: Tensor) -> Tensor | None:
        """Each row's noise for its current step (counter = steps done + 1), in one batched
        computation; None when no row is stochastic this step."""
        if not bool(needed.any()):
            return None
        return counter_normal(self.keys, (self.pos + 1).to(self.device), self.shape)


def _pad(plans: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(plans, (0, width - plans.shape[1]), value=-1)


def sample_progressive(
    net: Callable[..., Tensor],
    schedule: Schedule,
    specs: Sequence[SlotSpec],
    *,
    shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    num_classes: int = 0,
    clip_denoised: bool = True,
) -> Iterator[StepOutput]:
    """Run `specs` to the end together, yielding after every step (as improved-diffusion's
    `p_sample_loop_progressive`); finished slots are kept, their rows hold the final image.

    Each yield holds new tensors (never modified afterwards, by this loop or the batch):
    while no slot has finished they are the step's own outputs, without a copy.
    """
    batch = SlotBatch(net, schedule, shape=shape, device=device, num_classes=num_classes,
                      clip_denoised=clip_denoised)
    batch.add(specs)
    n = len(specs)
    done = torch.zeros(n, dtype=torch.bool)
    steps = torch.zeros(n, dtype=torch.long)
    x_t, x0 = batch.x, torch.zeros_like(batch.x)
    while not bool(done.all()):
        active = torch.nonzero(~done).flatten()
        out = batch.step()
        if len(active) == n:     # rows are still the specs
            x_t, x0, steps, done = out.x_t, out.x0, out.steps_done, out.finished
        else:                    # out-of-place, so that earlier yields stay as they were
            rows = active.to(x_t.device)
            x_t, x0 = x_t.index_copy(0, rows, out.x_t), x0.index_copy(0, rows, out.x0)
            steps = steps.index_copy(0, active, out.steps_done)
            done = done.index_copy(0, active, out.finished)
        batch.keep(~out.finished)
        yield StepOutput(x_t=x_t, x0=x0, steps_done=steps, finished=done)


def sample(
    net: Callable[..., Tensor],
    schedule: Schedule,
    specs: Sequence[SlotSpec],
    **kwargs: object,
) -> Tensor:
    """Final images `[N x C x H x W]` in model space for `specs`."""
    last = deque(sample_progressive(net, schedule, specs, **kwargs), maxlen=1)  # type: ignore[arg-type]
    return last[0].x_t
