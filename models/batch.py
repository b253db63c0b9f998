"""A batch of independent sampling trajectories ("slots") advanced one step at a time.

Each slot is one image: its own timestep plan (step count), sampler, η, label, guidance
scale and random generator. `step` runs one network forward for every slot, whatever its
timestep, then each slot's own update. Slots can be added and removed between any two
steps, which is what a continuous-batching server needs; the offline sampler uses the same
class, so there is one code path for sampling.

Host-side state (plans, positions, coefficients) stays on the CPU so that no step has to
wait for the device to decide what to do next.

Image-conditioned slots use the same step, differing only in where they start and in their
plan (so they batch with plain ones):
- img2img (SDEdit, Meng et al. 2022): start at t0 = `start_timestep(strength, T)` from
  x_t0 = √ᾱ_t0 A + √(1 − ᾱ_t0) ε, ε being the slot's own x_T noise; strength 1 is plain
  generation, bit for bit;
- interpolation (Ho et al. 2020 §4.4): x_t0 = (1 − λ) enc(A) + λ enc(B) with the same ε;
- inpainting (RePaint, Lugmayr et al. 2022): after every denoising step the kept region
  (mask 0) is replaced by the input noised to t_next (the input itself at the end), with
  noise from the slot's counter + 2**40 (`KNOWN_NOISE_OFFSET`), a stream the sampler (counters
  1…plan length) never reaches; with resampling the plan also goes back up ("undo" steps).
Plain batches pay two host bool checks per step for all this (any undo, any mask).

A slot's exact state between two steps (`export`) continues in another batch, process or
device (`add(specs, states)`), bit for bit: models/resume.py says what it holds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .resume import SlotState, check_states, plan_points, reads_prev, state_tensors
from .samplers import SamplerKind, apply_step, guided_eps, step_coefficients
from .schedule import Schedule, check_steps, repaint_plan, start_timestep
from .seeding import counter_normal, image_seed

# Counter offset of the noise that brings an inpainting input to t_next (see the module doc).
KNOWN_NOISE_OFFSET = 2**40
PlanKey = tuple[int, int, int, int]     # a plan's (steps, t0, jump_length, jump_n_sample)


@dataclass(frozen=True, eq=False)   # eq=False: tensors have no boolean equality
class SlotSpec:
    """What one image asks for.

    `init` `[C,H,W]` (model space [-1, 1]) makes it img2img from `strength`; with `mask`
    `[1,H,W]` (1 = generate, 0 = keep) inpainting, with RePaint resampling when
    jump_n_sample > 1 (jump_* are ignored without a mask); with `init_b` an interpolation
    frame at λ = `mix` between `init` and `init_b` (frames of one request share seed and
    index, so they share noise).
    """

    seed: int
    index: int = 0                      # image number within its request
    steps: int = 50
    kind: SamplerKind = SamplerKind.DDIM
    eta: float = 0.0                    # DDIM only
    label: int | None = None            # class for conditional models; None = unconditional
    guidance: float = 1.0               # classifier-free guidance scale (1 = none)
    init: Tensor | None = None          # [C,H,W] the input / image A
    strength: float = 1.0               # (0, 1]: how far into the noise the input goes
    mask: Tensor | None = None          # [1,H,W] 1 = generate, 0 = keep; needs init
    init_b: Tensor | None = None        # [C,H,W] interpolation's image B; needs init
    mix: float = 0.0                    # interpolation λ in [0, 1]
    jump_length: int = 10               # RePaint: steps of each jump back
    jump_n_sample: int = 1              # RePaint: passes over each jump (1 = no resampling)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be finite, got {self.guidance}")
        if not (math.isfinite(self.strength) and 0 < self.strength <= 1):
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not (math.isfinite(self.mix) and 0 <= self.mix <= 1):
            raise ValueError(f"mix must be in [0, 1], got {self.mix}")
        if self.jump_length < 1 or self.jump_n_sample < 1:
            raise ValueError("jump_length and jump_n_sample must be >= 1")
        if self.init is None:
            for name in ("mask", "init_b"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs init")
            if self.strength != 1.0:
                raise ValueError("strength needs init")
        elif self.init.ndim != 3:
            raise ValueError(f"init must be [C,H,W], got shape {tuple(self.init.shape)}")
        if self.mask is not None:
            if self.init_b is not None:
                raise ValueError("mask and init_b exclude each other")
            if self.mask.ndim != 3 or self.mask.shape[0] != 1:
                raise ValueError(f"mask must be [1,H,W], got shape {tuple(self.mask.shape)}")
            if bool((self.mask < 0).any() | (self.mask > 1).any()):
                raise ValueError("mask values must be in [0, 1]")
        if self.init_b is None and self.mix != 0.0:
            raise ValueError("mix needs init_b")

    @property
    def conditioned(self) -> bool:
        """Starts from an input image rather than pure noise."""
        return self.init is not None and self.strength < 1.0

    @property
    def resampling(self) -> bool:
        return self.mask is not None and self.jump_n_sample > 1


@dataclass
class StepOutput:
    """What one `step` produced, row-aligned with the batch before retirement."""

    x_t: Tensor        # `[N x C x H x W]` after the step (x at each slot's t_next)
    x0: Tensor         # `[N x C x H x W]` this step's prediction of the clean image
    #                    (an undo step predicts nothing: the previous one is repeated)
    steps_done: Tensor  # `[N]` long, host: steps each slot has completed
    finished: Tensor   # `[N]` bool, host: slots at the end of their plan (the clean image;
    #                    a resampling plan may pass through it earlier, and go back up)


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
        self.plans = torch.empty((0, 1), dtype=torch.long)   # rows: plan, then −1 padding
        self.length = torch.empty(0, dtype=torch.long)       # steps of each row's plan
        self.pos = torch.empty(0, dtype=torch.long)
        self.kind = torch.empty(0, dtype=torch.long)
        self.eta = torch.empty(0, dtype=torch.float64)
        self.labels = torch.empty(0, dtype=torch.long)
        self.guidance = torch.empty(0, dtype=torch.float64)
        self.keys = torch.empty(0, dtype=torch.long, device=self.device)  # per-image noise key
        # Inpainting: the input (zeros) and mask (ones = all generated) of every row, on the
        # device; which rows have one (host), and how many, so plain steps skip it all.
        self.known = torch.empty((0, c, h, w), device=self.device)
        self.mask = torch.empty((0, 1, h, w), device=self.device)
        self.masked = torch.empty(0, dtype=torch.bool)
        self._num_masked = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def total_steps(self) -> Tensor:
        """`[N]` long: each slot's step count (its plan's length, resampling included)."""
        return self.length.clone()

    def add(self, specs: Sequence[SlotSpec],
            states: Sequence[SlotState | None] | None = None) -> None:
        """Append slots; each starts from its own counter-0 noise (x_T), or from its input
        image(s) noised with it to its start timestep, or, given its state (`export`), goes
        on from there. ValueError, with the batch unchanged, if one cannot run."""
        if not specs:
            return
        plans, plan_keys = self._plans(specs)
        width = max(self.plans.shape[1], max(len(p) for p in plans.values()) + 1)
        padded = {k: _pad(p[None], width)[0] for k, p in plans.items()}
        rows = torch.stack([padded[k] for k in plan_keys])
        length = torch.tensor([len(plans[k]) for k in plan_keys])
        kind = torch.tensor([int(s.kind) for s in specs])
        eta = torch.tensor([s.eta for s in specs], dtype=torch.float64)
        held = list(states) if states is not None else [None] * len(specs)
        pos = check_states(self.schedule, self.shape, held, rows, length, kind, eta)
        keys = torch.tensor([image_seed(s.seed, s.index) for s in specs], device=self.device)
        x, x0_prev = state_tensors(held, self.shape, self.device)
        fresh = [i for i, st in enumerate(held) if st is None]
        if fresh:
            x[fresh] = self._start([specs[i] for i in fresh], keys[fresh])
        self.plans = torch.cat([_pad(self.plans, width), rows])
        self.length = torch.cat([self.length, length])
        masked = [s.mask is not None for s in specs]
        self.masked = torch.cat([self.masked, torch.tensor(masked, dtype=torch.bool)])
        self._num_masked += sum(masked)
        known = torch.zeros((len(specs), *self.shape), device=self.device)
        mask = torch.ones((len(specs), 1, *self.shape[1:]), device=self.device)
        for i, s in enumerate(specs):
            if s.mask is not None and s.init is not None:
                known[i] = s.init.to(self.device, torch.float32)
                mask[i] = s.mask.to(self.device, torch.float32)
        self.known = torch.cat([self.known, known])
        self.mask = torch.cat([self.mask, mask])
        self.x = torch.cat([self.x, x])
        self.x0_prev = torch.cat([self.x0_prev, x0_prev])
        self.pos, self.kind = torch.cat([self.pos, pos]), torch.cat([self.kind, kind])
        self.eta = torch.cat([self.eta, eta])
        labels = [self.num_classes if s.label is None else s.label for s in specs]
        self.labels = torch.cat([self.labels, torch.tensor(labels, dtype=torch.long)])
        guid = [1.0 if s.label is None else s.guidance for s in specs]
        self.guidance = torch.cat([self.guidance, torch.tensor(guid, dtype=torch.float64)])
        self.keys = torch.cat([self.keys, keys])

    def _plans(self, specs: Sequence[SlotSpec]) -> tuple[dict[PlanKey, Tensor], list[PlanKey]]:
        """Each spec's plan, one per (steps, t0, jumps); ValueError if one cannot run."""
        T = self.schedule.num_timesteps
        plans: dict[PlanKey, Tensor] = {}
        plan_keys: list[PlanKey] = []
        for s in specs:
            if s.label is not None and not (self.num_classes and 0 <= s.label < self.num_classes):
                raise ValueError(f"label {s.label} is out of range for this model")
            self._check_shapes(s)
            t0 = start_timestep(s.strength, T) if s.init is not None else T - 1
            check_steps(s.steps, t0 + 1, f"steps (strength {s.strength} of {T} timesteps)")
            key = (s.steps, t0, s.jump_length, s.jump_n_sample) if s.resampling \
                else (s.steps, t0, 1, 1)
            if key not in plans:
                plans[key] = repaint_plan(s.steps, t0 + 1, key[2], key[3])
            plan_keys.append(key)
        return plans, plan_keys

    def _start(self, specs: Sequence[SlotSpec], keys: Tensor) -> Tensor:
        """x at the first plan entry: counter-0 noise x_T, encoded for conditioned slots."""
        x_T = counter_normal(keys, torch.zeros_like(keys), self.shape)   # counter 0: x_T
        return self._encode(specs, x_T) if any(s.conditioned for s in specs) else x_T

    def export(self, rows: Sequence[int]) -> list[SlotState]:
        """The exact states of these rows between two steps, on the host: what `add`
        continues from (models/resume.py). ValueError for a row at its plan's end."""
        idx = torch.tensor(list(rows), dtype=torch.long)
        if bool((self.pos[idx] >= self.length[idx]).any()):
            raise ValueError("a finished slot has no state to continue from")
        need = reads_prev(self.schedule, self.plans[idx], self.pos[idx], self.kind[idx],
                          self.eta[idx])
        dev = idx.to(self.device)
        x = self.x[dev].to("cpu", torch.float32)        # one copy to the host for all
        prev = self.x0_prev[dev[need.to(self.device)]].to("cpu", torch.float32)
        at = torch.cumsum(need, 0) - 1                  # row k's index into prev
        return [SlotState(pos=int(self.pos[r]), x=x[k],
                          x0_prev=prev[int(at[k])] if bool(need[k]) else None)
                for k, r in enumerate(idx.tolist())]

    def _check_shapes(self, s: SlotSpec) -> None:
        for name, want in (("init", self.shape), ("init_b", self.shape),
                           ("mask", (1, *self.shape[1:]))):
            v = getattr(s, name)
            if v is not None and tuple(v.shape) != want:
                raise ValueError(f"{name} must have shape {list(want)} for this model, "
                                 f"got {list(v.shape)}")

    def _encode(self, specs: Sequence[SlotSpec], eps: Tensor) -> Tensor:
        """x_t0 of the conditioned slots, √ᾱ_t0 A + √(1 − ᾱ_t0) ε (SDEdit), mixed with the
        same for B at λ for interpolation; other rows keep ε exactly."""
        T = self.schedule.num_timesteps
        x = eps.clone()
        for i, s in enumerate(specs):
            if not s.conditioned or s.init is None:
                continue
            ab = float(self.schedule.alphas_cumprod[start_timestep(s.strength, T)])
            a, e = math.sqrt(ab), math.sqrt(1.0 - ab)
            x[i] = a * s.init.to(self.device, torch.float32) + e * eps[i]
            if s.init_b is not None:
                enc_b = a * s.init_b.to(self.device, torch.float32) + e * eps[i]
                x[i] = (1.0 - s.mix) * x[i] + s.mix * enc_b
        return x

    def keep(self, mask: Tensor) -> None:
        """Retain only the slots where the host bool `[N]` mask is true."""
        if len(mask) == len(self) and bool(mask.all()):
            return      # the common step: nobody finished, nothing to copy
        idx = torch.nonzero(mask).flatten()
        dev_idx = idx.to(self.device)
        self.x, self.x0_prev = self.x[dev_idx], self.x0_prev[dev_idx]
        self.plans, self.pos, self.kind = self.plans[idx], self.pos[idx], self.kind[idx]
        self.eta, self.labels, self.guidance = self.eta[idx], self.labels[idx], self.guidance[idx]
        self.keys, self.length = self.keys[dev_idx], self.length[idx]
        self.known, self.mask = self.known[dev_idx], self.mask[dev_idx]
        self.masked = self.masked[idx]
        self._num_masked = int(self.masked.sum())
        width = int(self.length.max()) + 1 if len(idx) else 1
        self.plans = self.plans[:, :width]

    @torch.no_grad()
    def step(self) -> StepOutput:
        """One network forward for all slots, then each slot's own update."""
        if len(self) == 0:
            raise ValueError("no slots to step")
        t, t_next, t_prev = plan_points(self.plans, self.pos)
        coefs = step_coefficients(self.schedule, self.kind, t, t_next, t_prev, self.eta)
        inpainting = self._num_masked > 0
        # An undo from the clean image (t = −1) runs the net at 0: its output is unused.
        t_dev = (t.clamp(min=0) if inpainting else t).to(self.device, non_blocking=True)
        y = self.labels.to(self.device, non_blocking=True) if self.num_classes else None
        eps = guided_eps(self.net, self.x, t_dev, y, self.guidance,
                         self.num_classes if self.num_classes else None)
        noise = self._noise(coefs.needs_noise)
        x_next, x0 = apply_step(self._tables, self.x, eps, t_dev, coefs, x0_prev=self.x0_prev,
                                noise=noise, clip_denoised=self.clip_denoised)
        if inpainting:
            x_next, x0 = self._constrain(x_next, x0, t, t_next)
        self.x, self.x0_prev = x_next, x0
        self.pos = self.pos + 1
        return StepOutput(x_t=x_next, x0=x0, steps_done=self.pos.clone(),
                          finished=self.pos >= self.length)

    def _constrain(self, x_next: Tensor, x0: Tensor, t: Tensor,
                   t_next: Tensor) -> tuple[Tensor, Tensor]:
        """RePaint: after a denoising step of a masked row, x_next = m x_next + (1 − m) known,
        known = √ᾱ_n A + √(1 − ᾱ_n) ε_k (exactly A at t_next = −1, where ᾱ = 1). An undo row
        keeps its previous x̂0 (it made no prediction)."""
        undo = t_next > t
        if bool(undo.any()):
            rows = torch.nonzero(undo).flatten().to(self.device)
            x0 = x0.index_copy(0, rows, self.x0_prev[rows])
        rows = torch.nonzero(self.masked & ~undo).flatten()
        if len(rows) == 0:
            return x_next, x0
        ab = self.schedule.alpha_bar(t_next[rows]).to(torch.float64)
        dev = rows.to(self.device)

        def col(v: Tensor) -> Tensor:
            return v.to(device=self.device, dtype=torch.float32).view(-1, 1, 1, 1)

        eps_k = counter_normal(self.keys[dev], (self.pos[rows] + 1 + KNOWN_NOISE_OFFSET)
                               .to(self.device), self.shape)
        known = col(ab.sqrt()) * self.known[dev] + col((1.0 - ab).sqrt()) * eps_k
        m = self.mask[dev]
        return x_next.index_copy(0, dev, m * x_next[dev] + (1.0 - m) * known), x0

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
