"""DDIM with 0 < η < 1, pinned by value: against diffusers' DDIMScheduler(eta=0.5) on the
same noise, and against the closed form of Song et al. (2021), eq. 16.

η = 0 and η = 1 alone cannot pin σ: σ = η·s and σ = η²·s (or any f(η) with f(0) = 0,
f(1) = 1) agree there, and the other tests only look at those two values.
"""

from __future__ import annotations

import pytest
import torch

from models import SamplerKind, spaced_timesteps
from models.samplers import step_coefficients

from test_samplers_vs_diffusers import COMMON, SCHED, ours, theirs  # isort: skip

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_eta_half_matches_diffusers(steps: int) -> None:
    s = diffusers.DDIMScheduler(**COMMON, clip_sample=False, set_alpha_to_one=True)
    got = ours(SamplerKind.DDIM, steps, eta=0.5)
    want = theirs(s, steps, eta=0.5)
    assert (got - want).abs().max() < 1e-5
    # The comparison is not vacuous: η = 0.5 lands elsewhere than η = 0 and η = 1.
    for other in (0.0, 1.0):
        assert (ours(SamplerKind.DDIM, steps, eta=other) - want).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.25, 0.5, 0.8])
def test_ddim_coefficients_are_the_closed_form(eta: float) -> None:
    """x_next = √ᾱ_n x̂0 + √(1 − ᾱ_n − σ²) ε̂ + σ z with
    σ = η √((1 − ᾱ_n)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_n) and ε̂ = (x_t − √ᾱ_t x̂0)/√(1 − ᾱ_t)."""
    plan = spaced_timesteps(20, 1000)
    t = plan
    t_next = torch.cat([plan[1:], torch.tensor([-1])])
    t_prev = torch.cat([torch.tensor([-1]), plan[:-1]])
    n = len(t)
    c = step_coefficients(SCHED, torch.full((n,), int(SamplerKind.DDIM)), t, t_next, t_prev,
                          torch.full((n,), eta, dtype=torch.float64))
    ab = SCHED.alphas_cumprod.double()
    ab_t = ab[t]
    ab_n = torch.where(t_next >= 0, ab[t_next.clamp(min=0)], torch.ones_like(ab_t))
    sigma = eta * ((1 - ab_n) / (1 - ab_t) * (1 - ab_t / ab_n)).sqrt()
    a = (1 - ab_n - sigma**2).sqrt() / (1 - ab_t).sqrt()
    b = ab_n.sqrt() - a * ab_t.sqrt()
    assert torch.allclose(c.sigma, sigma, rtol=1e-12, atol=1e-15)
    assert torch.allclose(c.a, a, rtol=1e-12, atol=1e-15)
    assert torch.allclose(c.b, b, rtol=1e-12, atol=1e-15)
    assert bool((c.c == 0).all())
    assert c.sigma[-1] == 0 and bool((c.sigma[:-1] > 0).all())
