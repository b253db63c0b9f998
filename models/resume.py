"""The exact state of a slot between two steps, to continue it in another batch.

What a slot's next steps read is either given by its `SlotSpec` (the plan, sampler, η,
label, guidance, noise key, input images) or is one of three things, and only these:

- its position in its plan (steps done; RePaint's undo steps are entries of the plan, so
  the position also says where a resampling walk is, and it is the counter of every noise
  the slot still draws: sampler noise at position + 1, the kept region's at + 2**40);
- x at that position, as the batch keeps it (float32);
- the previous step's x̂0, where the next step reads it: DPM-Solver++(2M)'s second-order
  term (c ≠ 0), or an undo step, which repeats it as its own x̂0 (a snapshot's picture).

Noise being counter-based, a slot added with its state (`SlotBatch.add(specs, states)`) in
another process, on another device, beside other slots, takes the same remaining steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .samplers import step_coefficients
from .schedule import Schedule


@dataclass(frozen=True, eq=False)   # eq=False: tensors have no boolean equality
class SlotState:
    """One slot after `pos` steps of its plan: what `SlotBatch.export` gives and
    `SlotBatch.add` takes back."""

    pos: int                        # steps done: the index of its current plan entry
    x: Tensor                       # `[C x H x W]` float32: x at that entry
    x0_prev: Tensor | None = None   # `[C x H x W]` float32 previous x̂0, where it is read


def plan_points(plans: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t, t_next, t_prev) of every row at `pos` in its padded plan (`plans` `[N x L]`,
    `pos` `[N]` long, host): t_prev is −1 on a row's first step."""
    rows = torch.arange(len(pos))
    t = plans[rows, pos]
    t_next = plans[rows, pos + 1]
    t_prev = torch.where(pos > 0, plans[rows, (pos - 1).clamp(min=0)], -1)
    return t, t_next, t_prev


def reads_prev(schedule: Schedule, plans: Tensor, pos: Tensor, kind: Tensor,
               eta: Tensor) -> Tensor:
    """`[N]` bool, host: rows whose next step reads x̂0_prev (the samplers' own c ≠ 0, or an
    undo step), so a state must carry it there and nowhere else."""
    t, t_next, t_prev = plan_points(plans, pos)
    coefs = step_coefficients(schedule, kind, t, t_next, t_prev, eta)
    return (pos > 0) & ((coefs.c != 0) | (t_next > t))


def check_states(schedule: Schedule, shape: tuple[int, int, int],
                 states: Sequence[SlotState | None], plans: Tensor, length: Tensor,
                 kind: Tensor, eta: Tensor) -> Tensor:
    """`[N]` long positions of new rows (0 where no state: a fresh slot; `plans` `[N x L]`
    padded, `length`, `kind`, `eta` `[N]`, host); ValueError if a state cannot continue
    its slot: past its plan's end, another shape, or without an x̂0_prev it reads."""
    if len(states) != len(plans):
        raise ValueError(f"{len(states)} states for {len(plans)} slots")
    pos = torch.tensor([0 if st is None else st.pos for st in states], dtype=torch.long)
    for i, st in enumerate(states):
        if st is None:
            continue
        if not 0 <= st.pos < int(length[i]):
            raise ValueError(f"a state at step {st.pos} of a {int(length[i])}-step slot")
        for name in ("x", "x0_prev"):
            v = getattr(st, name)
            if v is not None and tuple(v.shape) != shape:
                raise ValueError(f"a state's {name} must have shape {list(shape)}, "
                                 f"got {list(v.shape)}")
    if all(st is None for st in states):       # fresh slots (nearly every add): nothing to read
        return pos
    for i in torch.nonzero(reads_prev(schedule, plans, pos, kind, eta)).flatten().tolist():
        st = states[i]
        if st is not None and st.x0_prev is None:
            raise ValueError(f"the state at step {st.pos} lacks the x̂0_prev its next step reads")
    return pos


def state_tensors(states: Sequence[SlotState | None], shape: tuple[int, int, int],
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """(x, x̂0_prev) `[N x C x H x W]` float32 of new rows on `device`: the states' own, x
    left unset and x̂0_prev zero (a fresh slot's) where a row has none."""
    x = torch.empty((len(states), *shape), device=device)
    x0_prev = torch.zeros_like(x)
    for i, st in enumerate(states):
        if st is not None:
            x[i] = st.x.to(device, torch.float32)
            if st.x0_prev is not None:
                x0_prev[i] = st.x0_prev.to(device, torch.float32)
    return x, x0_prev
