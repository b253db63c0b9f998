"""Samplers: exactness on analytic models, determinism, DDIM η=1 ≡ DDPM fixed-small."""

from __future__ import annotations

import pytest
import torch

from models import DiffusionConfig, SamplerKind, Schedule, SlotBatch, SlotSpec, sample
from models.samplers import step_coefficients

SCHED = Schedule.from_config(DiffusionConfig())
ALL_KINDS = list(SamplerKind)


def gaussian_eps(schedule: Schedule, std: float):  # type: ignore[no-untyped-def]
    """The exact ε-predictor for data ~ N(0, std² I): E[x0|x_t] = √ᾱ s² x_t / (ᾱ s² + 1 − ᾱ)."""
    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = ab.sqrt() * std**2 / (ab * std**2 + 1 - ab) * x.double()
        return ((x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()).float()
    return net


def point_eps(schedule: Schedule, target: torch.Tensor):  # type: ignore[no-untyped-def]
    """The exact ε-predictor when all data is the single image `target`."""
    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()
    return net


def run(net, specs, *, shape=(1, 4, 4), clip=True) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return sample(net, SCHED, specs, shape=shape, clip_denoised=clip)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("steps", [1, 10, 100])
def test_every_sampler_recovers_a_point_mass_exactly(kind: SamplerKind, steps: int) -> None:
    target = torch.linspace(-0.9, 0.9, 16).view(1, 4, 4)
    specs = [SlotSpec(seed=s, steps=steps, kind=kind, eta=0.5) for s in range(3)]
    out = run(point_eps(SCHED, target), specs)
    assert (out - target).abs().max() < 1e-4


@pytest.mark.parametrize(("kind", "steps", "eta", "rel"), [
    (SamplerKind.DDIM, 200, 0.0, 0.02),
    (SamplerKind.DDIM, 1000, 1.0, 0.02),
    (SamplerKind.DPMPP_2M, 50, 0.0, 0.01),
    (SamplerKind.DDPM_SMALL, 1000, 0.0, 0.02),
    (SamplerKind.DDPM_LARGE, 250, 0.0, 0.02),
])
def test_samplers_reproduce_a_gaussian_data_distribution(
    kind: SamplerKind, steps: int, eta: float, rel: float
) -> None:
    """With the exact ε of N(0, 0.5²) data every sampler must return that distribution.

    64k values give the std to ~0.3%; the rest of each bound is the sampler's own bias at
    this step count (first-order DDIM converges slowly; σ² = β̃ under-disperses and σ² = β
    over-disperses slightly, as Ho et al. note).
    """
    std = 0.5
    specs = [SlotSpec(seed=7, index=i, steps=steps, kind=kind, eta=eta) for i in range(1024)]
    out = run(gaussian_eps(SCHED, std), specs, shape=(1, 8, 8), clip=False)
    assert out.mean().item() == pytest.approx(0.0, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=rel)


def test_dpm_solver_2m_is_second_order() -> None:
    """Its error against the exact ODE solution must fall about 4× when steps double."""
    std = 0.5
    net = gaussian_eps(SCHED, std)
    # The probability-flow ODE of Gaussian data is solved exactly by DDIM η=0 in the limit;
    # use 1000 steps of 2M as the reference.
    ref = run(net, [SlotSpec(seed=3, steps=1000, kind=SamplerKind.DPMPP_2M)], clip=False)
    errs = [(run(net, [SlotSpec(seed=3, steps=n, kind=SamplerKind.DPMPP_2M)], clip=False)
             - ref).abs().max().item() for n in (10, 20, 40)]
    assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3, errs
    ddim = [(run(net, [SlotSpec(seed=3, steps=n, kind=SamplerKind.DDIM)], clip=False)
             - ref).abs().max().item() for n in (10, 20)]
    assert errs[0] < ddim[0] and errs[1] < ddim[1]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_same_seed_same_images_and_other_seed_other_images(net, kind: SamplerKind) -> None:
    shape = (3, 16, 16)
    a = sample(net, SCHED, [SlotSpec(seed=5, steps=5, kind=kind, eta=1.0)], shape=shape)
    b = sample(net, SCHED, [SlotSpec(seed=5, steps=5, kind=kind, eta=1.0)], shape=shape)
    c = sample(net, SCHED, [SlotSpec(seed=6, steps=5, kind=kind, eta=1.0)], shape=shape)
    assert a.shape == (1, *shape)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def _with_fresh_noise_keys(batch: SlotBatch, seed: int) -> None:
    batch.keys = torch.arange(len(batch)) + seed


@pytest.mark.parametrize(("kind", "eta", "deterministic"), [
    (SamplerKind.DDIM, 0.0, True),
    (SamplerKind.DPMPP_2M, 0.0, True),
    (SamplerKind.DDIM, 0.5, False),
    (SamplerKind.DDPM_SMALL, 0.0, False),
])
def test_only_stochastic_samplers_use_noise_after_x_T(net, kind, eta, deterministic) -> None:
    outs = []
    for noise_seed in (100, 200):
        batch = SlotBatch(net, SCHED, shape=(3, 16, 16))
        batch.add([SlotSpec(seed=1, steps=8, kind=kind, eta=eta)])
        _with_fresh_noise_keys(batch, noise_seed)  # same x_T, different later noise
        for _ in range(8):
            out = batch.step()
        outs.append(out.x_t)
    assert torch.equal(outs[0], outs[1]) == deterministic


def test_ddim_eta_one_has_the_coefficients_of_ddpm_fixed_small() -> None:
    t = torch.arange(999, -1, -1)
    t_next, t_prev = t - 1, torch.full_like(t, -1)
    eta = torch.ones(1000, dtype=torch.float64)
    ddim = step_coefficients(SCHED, torch.full_like(t, SamplerKind.DDIM), t, t_next, t_prev, eta)
    ddpm = step_coefficients(SCHED, torch.full_like(t, SamplerKind.DDPM_SMALL), t, t_next,
                             t_prev, eta)
    for name in ("a", "b", "c", "sigma"):
        assert torch.allclose(getattr(ddim, name), getattr(ddpm, name), rtol=1e-9, atol=1e-12)
    assert torch.allclose(ddpm.sigma**2, SCHED.posterior_variance.flip(0), rtol=1e-9, atol=0)


def test_ddim_eta_one_over_all_steps_equals_ddpm_fixed_small(make_net) -> None:
    """Same seed ⇒ same x_T and the same noise draws; the two chains must coincide. The
    network is the tiny one cut to one 8x8 level without attention (still a UNet that reads
    t): 2 x 1000 forwards in ~1/10 of the tiny one's time, on one torch thread (ops this
    small gain nothing from a second, and under `make test`'s OMP_WAIT_POLICY=PASSIVE
    waking it costs 13 s against 4 s)."""
    torch.set_num_threads(1)        # the autouse `_threads` fixture sets 2 for the next test
    net = make_net(ch=8, ch_mult=(1,), attn_resolutions=(), image_size=8)
    shape = (3, 8, 8)
    specs = lambda kind: [SlotSpec(seed=11, index=i, steps=1000, kind=kind, eta=1.0)  # noqa: E731
                          for i in range(2)]
    ddim = sample(net, SCHED, specs(SamplerKind.DDIM), shape=shape)
    ddpm = sample(net, SCHED, specs(SamplerKind.DDPM_SMALL), shape=shape)
    assert (ddim - ddpm).abs().max().item() < 1e-4


def test_fixed_large_differs_from_fixed_small_only_in_noise_scale() -> None:
    t = torch.tensor([999, 500, 10])
    args = (t, t - 1, torch.full_like(t, -1), torch.zeros(3, dtype=torch.float64))
    small = step_coefficients(SCHED, torch.full_like(t, SamplerKind.DDPM_SMALL), *args)
    large = step_coefficients(SCHED, torch.full_like(t, SamplerKind.DDPM_LARGE), *args)
    assert torch.equal(small.a, large.a) and torch.equal(small.b, large.b)
    assert torch.allclose(large.sigma**2, SCHED.betas[t])
    assert (large.sigma > small.sigma).all()


def test_final_step_adds_no_noise_and_returns_x0() -> None:
    kinds = torch.tensor([int(k) for k in ALL_KINDS])
    t = torch.full((4,), 20)
    c = step_coefficients(SCHED, kinds, t, torch.full((4,), -1), torch.full((4,), 40),
                          torch.ones(4, dtype=torch.float64))
    assert c.sigma.tolist() == [0.0] * 4
    assert torch.allclose(c.a, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(c.b, torch.ones(4, dtype=torch.float64))
    assert c.c.tolist() == [0.0] * 4
