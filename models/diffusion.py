"""Forward process and training objective: q(x_t | x_0), the ε-prediction loss, x̂0 from ε."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import Schedule

EpsModel = Callable[..., Tensor]


def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] as `[N x 1 x 1 x 1]` in the dtype and device of `like`."""
    return table.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t | x_0)."""
    return (_gather(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def predict_x0(schedule: Schedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x̂0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, written as 1/√ᾱ_t · x_t − √(1/ᾱ_t − 1) · ε."""
    return (_gather(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _gather(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def training_loss(
    net: EpsModel,
    schedule: Schedule,
    x0: Tensor,
    *,
    y: Tensor | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_simple of Ho et al. 2020: E_{t, ε} ‖ε − ε_θ(x_t, t)‖², t uniform in 0..T−1.

    `t` and `noise` default to fresh draws (from `generator` when given).
    """
    n = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (n,), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = q_sample(schedule, x0, t, noise)
    eps = net(x_t, t) if y is None else net(x_t, t, y)
    return F.mse_loss(eps.float(), noise.float())
