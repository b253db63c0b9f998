"""Noise schedules and every table derived from them, in float64.

Notation of Ho et al. 2020: β_t, α_t = 1 − β_t, ᾱ_t = ∏ α_s, posterior q(x_{t−1} | x_t, x_0)
with variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t). Timesteps are 0-based: t ∈ 0..T−1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import DiffusionConfig


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The paper's schedule: β linear from `beta_start` to `beta_end`, float64 `[T]`."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class Schedule:
    """β and its derived tables, float64 `[T]` tensors (CPU unless moved with `to`)."""

    betas: Tensor
    alphas_cumprod: Tensor            # ᾱ_t
    alphas_cumprod_prev: Tensor       # ᾱ_{t−1}, with ᾱ_{−1} = 1
    sqrt_alphas_cumprod: Tensor       # √ᾱ_t
    sqrt_one_minus_alphas_cumprod: Tensor  # √(1 − ᾱ_t)
    sqrt_recip_alphas_cumprod: Tensor      # 1/√ᾱ_t
    sqrt_recipm1_alphas_cumprod: Tensor    # √(1/ᾱ_t − 1)
    posterior_variance: Tensor        # β̃_t
    posterior_log_variance_clipped: Tensor  # log β̃_t, with β̃_0 replaced by β̃_1
    posterior_mean_coef1: Tensor      # coefficient of x_0 in μ̃_t
    posterior_mean_coef2: Tensor      # coefficient of x_t in μ̃_t

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1)")
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(betas) > 1 \
            else torch.log(post_var.clamp(min=1e-20))
        return cls(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log,
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        )

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> Schedule:
        if cfg.beta_schedule == "linear":
            betas = linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        else:
            betas = cosine_betas(cfg.num_timesteps)
        return cls.from_betas(betas)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ at timesteps `t` (long, any shape), with ᾱ = 1 where t = −1 (the clean image)."""
        ext = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return ext[t.to(ext.device) + 1]

    def to(self, device: torch.device | str) -> Schedule:
        """The same tables on `device` (still float64; callers cast after gathering)."""
        return Schedule(**{k: v.to(device) for k, v in self.__dict__.items()})


def spaced_timesteps(num_steps: int, num_timesteps: int) -> Tensor:
    """`num_steps` model timesteps from T−1 down, evenly spaced ("trailing" spacing).

    t_k = round(T (S − k) / S) − 1 for k = 0..S−1: the first step always starts from pure
    noise at T−1, the last from t ≈ T/S − 1 straight to the clean image, and S = T visits
    every timestep. (Lin et al. 2023 show this beats spacings that spend a step at t = 0.)
    Every sampler derives its coefficients from ᾱ at consecutive entries, which is the
    "respacing" of Nichol & Dhariwal without a second code path.
    Long `[num_steps]`, strictly decreasing.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {num_steps}")
    k = torch.arange(num_steps, dtype=torch.long)
    return (num_timesteps * (num_steps - k) + num_steps // 2) // num_steps - 1
