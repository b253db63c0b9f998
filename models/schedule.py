"""Noise schedules, every table derived from them (float64), and timestep plans.

Notation of Ho et al. 2020: β_t, α_t = 1 − β_t, ᾱ_t = ∏ α_s, posterior q(x_{t−1} | x_t, x_0)
with variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t). Timesteps are 0-based: t ∈ 0..T−1.

A plan is the list of timesteps a sample visits, −1 being the clean image. Plain sampling
goes down from T−1 (`spaced_timesteps`); image-conditioned sampling starts lower, at
`start_timestep(strength, T)` (SDEdit), and inpainting with resampling also goes back up
(`repaint_plan`, RePaint), so plans are not monotonic in general.
"""

from __future__ import annotations

import functools
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


def check_steps(num_steps: int, num_timesteps: int, name: str = "steps") -> None:
    """The range of a step count, 1..T: a plan visits distinct timesteps. ValueError naming
    `name` (the option or field) otherwise. `ddpm sample`, `ddpm eval` and plans check
    here; `contract.GenerationSpec.check_model` (torch-free) is tied to it by a test.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"{name} must be in 1..{num_timesteps}, got {num_steps}")


def spaced_timesteps(num_steps: int, num_timesteps: int) -> Tensor:
    """`num_steps` model timesteps from T−1 down, evenly spaced ("trailing" spacing).

    t_k = round(T (S − k) / S) − 1 for k = 0..S−1: the first step always starts from pure
    noise at T−1, the last from t ≈ T/S − 1 straight to the clean image, and S = T visits
    every timestep. (Lin et al. 2023 show this beats spacings that spend a step at t = 0.)
    Every sampler derives its coefficients from ᾱ at consecutive entries, which is the
    "respacing" of Nichol & Dhariwal without a second code path.
    Long `[num_steps]`, strictly decreasing.
    """
    check_steps(num_steps, num_timesteps)
    k = torch.arange(num_steps, dtype=torch.long)
    return (num_timesteps * (num_steps - k) + num_steps // 2) // num_steps - 1


def start_timestep(strength: float, num_timesteps: int) -> int:
    """t0 = ⌈strength · T⌉ − 1: the timestep an input image is noised to (SDEdit, Meng et al.
    2022), so strength 1 starts from pure noise at T−1 and steps spread over t0…0.

    Rounded to 6 decimals before the ceiling, so that 0.7 · 1000 is 700 (not 700.0000001);
    `contract.start_timestep` is the same arithmetic (a test ties them).
    """
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(0, math.ceil(round(strength * num_timesteps, 6)) - 1)


def repaint_plan(num_steps: int, num_timesteps: int, jump_length: int = 10,
                 jump_n_sample: int = 1) -> Tensor:
    """RePaint's resampling plan (Lugmayr et al. 2022) on our spacing: the timesteps a sample
    visits, long `[L]`, each entry followed by the next (and the last by −1, the clean image).

    The walk is diffusers' `RePaintScheduler.set_timesteps` in units of steps: going down
    from step S−1, at every step j in range(0, S − jump_length, jump_length) it goes back
    up jump_length steps (a noising "undo" per step) and down again, jump_n_sample − 1 times.
    After diffusers' entry v the sample is at step v − 1 (−1 = clean), which is mapped to
    our `spaced_timesteps(num_steps, num_timesteps)` (step k ↦ its k-th smallest timestep).
    The jump at j = 0 goes up from the clean image, so −1 also occurs inside the plan.
    L = S + 2 · jump_length · (jump_n_sample − 1) · #jumps; jump_n_sample = 1 gives
    `spaced_timesteps` itself. A copy of one made once per arguments (every slot a worker
    admits asks; ~40 µs of torch ops each time).
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError("jump_length and jump_n_sample must be >= 1")
    return _repaint_plan(num_steps, num_timesteps, jump_length, jump_n_sample).clone()


@functools.lru_cache(maxsize=256)
def _repaint_plan(num_steps: int, num_timesteps: int, jump_length: int,
                  jump_n_sample: int) -> Tensor:
    ascending = spaced_timesteps(num_steps, num_timesteps).flip(0)
    levels = torch.tensor(_repaint_levels(num_steps, jump_length, jump_n_sample),
                          dtype=torch.long)
    return torch.where(levels >= 0, ascending[levels.clamp(min=0)], -1)


@functools.lru_cache(maxsize=64)
def _repaint_levels(n: int, jump_length: int, jump_n_sample: int) -> tuple[int, ...]:
    """Step numbers visited (n−1 … then −1 excluded), diffusers' loop verbatim."""
    jumps = {j: jump_n_sample - 1 for j in range(0, n - jump_length, jump_length)}
    entries = []
    t = n
    while t >= 1:
        t -= 1
        entries.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                entries.append(t)
    # The sample starts at step n−1 and is at step v−1 after entry v; drop the final −1.
    return (n - 1, *(v - 1 for v in entries[:-1]))
