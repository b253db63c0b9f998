"""Reverse-process samplers as one per-sample affine update.

Every sampler here moves a sample from timestep t to t_next (−1 = the clean image) by

    x_next = a · x_t + b · x̂0 + c · x̂0_prev + σ · z,        z ~ N(0, I)

where x̂0 is this step's (clipped) prediction of the clean image, x̂0_prev the previous
step's, and (a, b, c, σ) are scalars per sample computed from ᾱ at the sample's own
t_prev, t and t_next:

- DDPM ancestral (Ho et al. 2020): the posterior mean μ̃(x_t, x̂0) with σ² = β̃ (fixed-small)
  or σ² = β (fixed-large), β taken between the two visited timesteps so that fewer steps
  are "respaced" as in Nichol & Dhariwal 2021;
- DDIM (Song et al. 2021) with η, using ε re-derived from the clipped x̂0 so that η = 1
  coincides with DDPM fixed-small;
- DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep second order; first order
  on a sample's first step, on its last step (to σ = 0), as k-diffusion does, and on the
  first step after an undo (the previous x̂0 belongs to another trajectory);
- an "undo" (t_next > t, RePaint's jump back): a draw from the forward process
  q(x_next | x_t) = N(√(ᾱ_n/ᾱ_t) x_t, (1 − ᾱ_n/ᾱ_t) I), i.e. a = √(ᾱ_n/ᾱ_t), b = c = 0,
  σ = √(1 − ᾱ_n/ᾱ_t), whatever the sampler.

Because the coefficients are gathered per sample, one batch can mix timesteps, step counts
and samplers: what continuous batching needs (diffusers' schedulers have one timestep per
batch). Coefficients are float64 on the host; the update is one fused tensor expression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor

from .config import VarianceType
from .diffusion import predict_x0
from .schedule import Schedule

SAMPLER_NAMES = ("ddpm", "ddim", "dpm++2m")


class SamplerKind(IntEnum):
    DDPM_SMALL = 0   # ancestral, σ² = β̃ (posterior variance)
    DDPM_LARGE = 1   # ancestral, σ² = β
    DDIM = 2         # η-parameterised
    DPMPP_2M = 3     # DPM-Solver++(2M)


def sampler_kind(name: str, variance_type: VarianceType = "fixed_small") -> SamplerKind:
    """Map a public sampler name to its kind; "ddpm" takes the checkpoint's variance."""
    if name == "ddpm":
        return SamplerKind.DDPM_LARGE if variance_type == "fixed_large" else SamplerKind.DDPM_SMALL
    if name == "ddim":
        return SamplerKind.DDIM
    if name == "dpm++2m":
        return SamplerKind.DPMPP_2M
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")


@dataclass(frozen=True)
class StepCoefficients:
    """Per-sample scalars of the update, float64 `[N]` on the host."""

    a: Tensor       # on x_t
    b: Tensor       # on x̂0
    c: Tensor       # on x̂0_prev (DPM-Solver++(2M) only)
    sigma: Tensor   # on fresh noise z

    @property
    def needs_noise(self) -> Tensor:
        return self.sigma > 0

    @property
    def needs_prev(self) -> bool:
        return bool((self.c != 0).any())


def step_coefficients(
    schedule: Schedule,
    kind: Tensor,
    t: Tensor,
    t_next: Tensor,
    t_prev: Tensor,
    eta: Tensor,
) -> StepCoefficients:
    """Coefficients for samples at `t` going to `t_next`.

    All arguments are `[N]` host tensors: `kind` (SamplerKind values), `t` ≥ −1,
    `t_next` (−1 = the clean image; t_next > t is an undo, only there may t be −1),
    `t_prev` the previous plan entry (−1 on a sample's first step), `eta` (DDIM only).

    Computed in NumPy: ~50 elementwise operations on a few dozen float64 values, once per
    step of every batch, cost ~240 µs as torch ops (dispatch, not arithmetic) and a tenth
    of that here (BENCHMARKS.md §16); float64 either way.
    """
    ab = np.concatenate([[1.0], schedule.alphas_cumprod.detach().cpu().numpy()])
    t_, n_, p_ = (v.numpy().astype(np.int64) + 1 for v in (t, t_next, t_prev))
    kind_ = kind.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):   # rows a sampler does not use
        a, b, c, var = _coefficients(ab, kind_, t_, n_, p_, eta.numpy().astype(np.float64))
    return StepCoefficients(*(torch.from_numpy(v) for v in (a, b, c, np.sqrt(var.clip(0)))))


def _coefficients(ab: np.ndarray, kind: np.ndarray, t: np.ndarray, t_next: np.ndarray,
                  t_prev: np.ndarray, eta: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, c, σ²) of `step_coefficients`, `ab` being ᾱ with ᾱ = 1 prepended for t = −1
    and the timesteps shifted by one to index it."""
    ab_t, ab_n = ab[t], ab[t_next]
    last = t_next == 0

    # DDPM: posterior q(x_next | x_t, x0) of the (respaced) chain between t and t_next.
    alpha_step = ab_t / ab_n
    beta_step = 1.0 - alpha_step
    post_x0 = beta_step * np.sqrt(ab_n) / (1.0 - ab_t)
    post_xt = (1.0 - ab_n) * np.sqrt(alpha_step) / (1.0 - ab_t)
    var_small = beta_step * (1.0 - ab_n) / (1.0 - ab_t)
    var_large = np.where(last, 0.0, beta_step)

    # DDIM: x_next = √ᾱ_n x̂0 + √(1 − ᾱ_n − σ²) ε̂ + σ z, ε̂ = (x_t − √ᾱ_t x̂0)/√(1 − ᾱ_t).
    sigma_ddim = eta * np.sqrt(((1.0 - ab_n) / (1.0 - ab_t) * beta_step).clip(0))
    eps_coef = np.sqrt((1.0 - ab_n - sigma_ddim**2).clip(0))
    ddim_a = eps_coef / np.sqrt(1.0 - ab_t)
    ddim_b = np.sqrt(ab_n) - ddim_a * np.sqrt(ab_t)

    # DPM-Solver++(2M) in α_s = √ᾱ, σ_s = √(1 − ᾱ), λ = log(α_s/σ_s); e^{−h} = (σ_n/α_n)/(σ_t/α_t).
    al_t, si_t, al_n, si_n = np.sqrt(ab_t), np.sqrt(1.0 - ab_t), np.sqrt(ab_n), np.sqrt(1.0 - ab_n)
    exp_neg_h = (si_n / al_n) / (si_t / al_t)
    dpm_a = si_n / si_t
    dpm_b = al_n * (1.0 - exp_neg_h)
    # Second order needs a previous denoising step (it came down to t) and a finite λ_next.
    second = (t_prev > t) & ~last
    ab_p = ab[np.where(second, t_prev, t)]
    lam_t, lam_p = _log_snr_half(ab_t), _log_snr_half(ab_p)
    lam_n = _log_snr_half(np.where(second, ab_n, ab_p))   # finite stand-in where unused
    r = np.where(second, (lam_t - lam_p) / (lam_n - lam_t), 1.0)
    half_inv_r = np.where(second, 0.5 / r, 0.0)

    ddim, dpm = kind == SamplerKind.DDIM, kind == SamplerKind.DPMPP_2M
    a = np.where(ddim, ddim_a, np.where(dpm, dpm_a, post_xt))
    b = np.where(ddim, ddim_b, np.where(dpm, dpm_b * (1.0 + half_inv_r), post_x0))
    c = np.where(dpm, -dpm_b * half_inv_r, 0.0)
    var = np.where(kind == SamplerKind.DDPM_SMALL, var_small,
                   np.where(kind == SamplerKind.DDPM_LARGE, var_large, sigma_ddim**2))
    var = np.where(dpm | last, 0.0, var)

    # Undo (RePaint): x_next ~ q(x_next | x_t); the terms above are unused (maybe NaN) there.
    undo = t_next > t
    if undo.any():
        ratio = ab_n / ab_t
        a = np.where(undo, np.sqrt(ratio), a)
        b = np.where(undo, 0.0, b)
        c = np.where(undo, 0.0, c)
        var = np.where(undo, 1.0 - ratio, var)
    return a, b, c, var


def _log_snr_half(alpha_bar: np.ndarray) -> np.ndarray:
    """λ = log(α_s/σ_s) = ½ log(ᾱ / (1 − ᾱ))."""
    return 0.5 * np.log(alpha_bar / (1.0 - alpha_bar))


def apply_step(
    schedule: Schedule,
    x_t: Tensor,
    eps: Tensor,
    t: Tensor,
    coefs: StepCoefficients,
    *,
    x0_prev: Tensor | None = None,
    noise: Tensor | None = None,
    clip_denoised: bool = True,
) -> tuple[Tensor, Tensor]:
    """One update for a batch `[N x C x H x W]`; returns (x_next, x̂0).

    `t` is `[N]` long on x_t's device; `noise` must be given (rows of samples without
    noise may hold anything) where any σ > 0, `x0_prev` where any c ≠ 0.
    """
    x0 = predict_x0(schedule, x_t.float(), t, eps.float())
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)

    def col(v: Tensor) -> Tensor:
        return v.to(device=x_t.device, dtype=torch.float32).view(-1, 1, 1, 1)

    x_next = col(coefs.a) * x_t.float() + col(coefs.b) * x0
    if coefs.needs_prev:
        if x0_prev is None:
            raise ValueError("x0_prev is required by a second-order step")
        x_next = x_next + col(coefs.c) * x0_prev
    if bool(coefs.needs_noise.any()):
        if noise is None:
            raise ValueError("noise is required by a stochastic step")
        x_next = x_next + col(coefs.sigma) * noise
    return x_next, x0


def guided_eps(
    net: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    y: Tensor | None = None,
    guidance: Tensor | None = None,
    null_label: int | None = None,
) -> Tensor:
    """ε, with classifier-free guidance ε_u + w (ε_c − ε_u) for the rows whose w ≠ 1.

    Only the guided rows are run a second time, with the null label, in the same forward.
    `y` `[N]` long on x's device; `guidance` `[N]` float on the host.
    """
    if y is None:
        return net(x, t)
    if guidance is None or null_label is None:
        return net(x, t, y)
    rows = torch.nonzero(guidance != 1.0).flatten()
    if len(rows) == 0:
        return net(x, t, y)
    rows_dev = rows.to(x.device)
    out = net(torch.cat([x, x[rows_dev]]), torch.cat([t, t[rows_dev]]),
              torch.cat([y, torch.full_like(y[rows_dev], null_label)]))
    eps, eps_u = out[: len(x)], out[len(x):]
    w = guidance[rows].to(device=x.device, dtype=eps.dtype).view(-1, 1, 1, 1)
    return eps.index_copy(0, rows_dev, eps_u + w * (eps[rows_dev] - eps_u))
