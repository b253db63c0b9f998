"""Our per-sample samplers against diffusers' one-timestep-per-batch schedulers.

Same ε-model (the exact one for Gaussian data), same x_T, same noise, same timesteps
("trailing" spacing in diffusers is ours): the trajectories must agree. This pins the
samplers to a reference implementation, so speed comparisons with diffusers compare the
same computation.
"""

from __future__ import annotations

import sys

import pytest
import torch

from models import DiffusionConfig, SamplerKind, Schedule, SlotSpec, sample, spaced_timesteps
from models.seeding import image_noise

diffusers = pytest.importorskip("diffusers")

SCHED = Schedule.from_config(DiffusionConfig())
SHAPE = (1, 4, 4)
SEED = 21


def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact ε for data ~ N(0, 0.5² I)."""
    ab = SCHED.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    x0 = ab.sqrt() * 0.25 / (ab * 0.25 + 1 - ab) * x.double()
    return ((x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()).float()


def ours(kind: SamplerKind, steps: int, eta: float = 0.0) -> torch.Tensor:
    spec = SlotSpec(seed=SEED, steps=steps, kind=kind, eta=eta)
    return sample(net, SCHED, [spec], shape=SHAPE, clip_denoised=False)


def theirs(scheduler, steps: int, **step_kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """diffusers' loop on our x_T, with its noise draws replaced by our stream (step k uses
    counter k + 1), so stochastic samplers are compared on identical noise."""
    x = image_noise(SEED, 0, 0, SHAPE)[None]
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps.long(), spaced_timesteps(steps, 1000))
    module = sys.modules[type(scheduler).__module__]
    original = module.randn_tensor
    try:
        for k, t in enumerate(scheduler.timesteps):
            noise = image_noise(SEED, 0, k + 1, SHAPE)[None]
            module.randn_tensor = lambda *a, _n=noise, **kw: _n.clone()
            eps = net(x, t.view(1).long())
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    finally:
        module.randn_tensor = original
    return x


COMMON = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
          "beta_end": 0.02, "timestep_spacing": "trailing"}


@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_ddim_matches_diffusers(steps: int) -> None:
    s = diffusers.DDIMScheduler(**COMMON, clip_sample=False, set_alpha_to_one=True)
    assert (ours(SamplerKind.DDIM, steps) - theirs(s, steps, eta=0.0)).abs().max() < 1e-5


@pytest.mark.parametrize("steps", [20, 50])
def test_dpm_solver_2m_matches_diffusers(steps: int) -> None:
    # ≥ 15 steps: below that diffusers also drops to first order one step before the end.
    s = diffusers.DPMSolverMultistepScheduler(
        **COMMON, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
        lower_order_final=True, thresholding=False)
    assert (ours(SamplerKind.DPMPP_2M, steps) - theirs(s, steps)).abs().max() < 1e-5


@pytest.mark.parametrize(("variance", "kind"), [("fixed_small", SamplerKind.DDPM_SMALL),
                                                ("fixed_large", SamplerKind.DDPM_LARGE)])
def test_ddpm_ancestral_matches_diffusers_over_all_steps(variance: str, kind: SamplerKind) -> None:
    s = diffusers.DDPMScheduler(**COMMON, variance_type=variance, clip_sample=False)
    assert (ours(kind, 1000) - theirs(s, 1000)).abs().max() < 1e-4


def test_respaced_ddpm_fixed_small_matches_diffusers() -> None:
    s = diffusers.DDPMScheduler(**COMMON, variance_type="fixed_small", clip_sample=False)
    assert (ours(SamplerKind.DDPM_SMALL, 50) - theirs(s, 50)).abs().max() < 1e-5
