"""Schedules against closed forms and the paper's endpoints."""

from __future__ import annotations

import math

import pytest
import torch

from models import DiffusionConfig, Schedule, cosine_betas, linear_betas, spaced_timesteps


def test_linear_schedule_matches_paper_endpoints() -> None:
    s = Schedule.from_config(DiffusionConfig())
    assert s.num_timesteps == 1000
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    steps = s.betas[1:] - s.betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), atol=1e-15)
    # ᾱ_T of the paper's schedule: the signal left at t = T is about 4e-5 (SNR ≈ 4e-5).
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_derived_tables_match_closed_forms() -> None:
    s = Schedule.from_betas(linear_betas(1000))
    b = s.betas
    ac = torch.tensor([math.prod((1 - b[: i + 1]).tolist()) for i in range(0, 1000, 97)],
                      dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod[::97], ac, rtol=1e-12)
    assert s.alphas_cumprod_prev[0] == 1.0
    assert torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); β̃_0 = 0, and 0 < β̃_t ≤ β_t afterwards.
    assert s.posterior_variance[0] == 0.0
    assert (s.posterior_variance[1:] > 0).all() and (s.posterior_variance <= b).all()
    # Noiseless chain: x_t = √ᾱ_t x0 ⇒ the posterior mean μ̃(x_t, x0) = √ᾱ_{t−1} x0.
    t = torch.arange(1, 1000)
    x0 = torch.full((999,), 0.7, dtype=torch.float64)
    x_t = s.sqrt_alphas_cumprod[t] * x0
    mu = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x_t
    assert torch.allclose(mu, s.alphas_cumprod_prev[t].sqrt() * x0, rtol=1e-10)
    assert torch.allclose(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod,
                          torch.ones(1000, dtype=torch.float64))


def test_cosine_schedule_follows_its_formula() -> None:
    T, s_ = 1000, 0.008
    b = cosine_betas(T)
    assert b.dtype == torch.float64 and (b > 0).all() and (b <= 0.999).all()
    ac = torch.cumprod(1 - b, 0)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert ac[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_alpha_bar_of_minus_one_is_one() -> None:
    s = Schedule.from_config(DiffusionConfig())
    got = s.alpha_bar(torch.tensor([-1, 0, 999]))
    assert got.tolist() == [1.0, s.alphas_cumprod[0].item(), s.alphas_cumprod[-1].item()]


@pytest.mark.parametrize("n", [1, 2, 7, 50, 999, 1000])
def test_spaced_timesteps(n: int) -> None:
    ts = spaced_timesteps(n, 1000)
    assert len(ts) == n and ts[0] == 999
    assert ts[-1] == round(1000 / n) - 1
    assert (ts[:-1] > ts[1:]).all()
    gaps = ts[:-1] - ts[1:]
    assert n == 1 or gaps.max() - gaps.min() <= 1  # evenly spaced up to rounding
    if n == 1000:
        assert torch.equal(ts, torch.arange(999, -1, -1))


@pytest.mark.parametrize("n", [0, 1001, -3])
def test_spaced_timesteps_rejects_out_of_range(n: int) -> None:
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.1000"):
        spaced_timesteps(n, 1000)
