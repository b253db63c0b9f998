"""Image-conditioned sampling: img2img (SDEdit), interpolation, inpainting (RePaint).

Small random networks, as the other model tests: what is checked is the arithmetic (where a
trajectory starts, what the plan visits, which region is pinned to the input, which noise
streams are used, batch invariance), not image quality (test_conditioning_quality.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from models import (
    DiffusionConfig,
    SamplerKind,
    Schedule,
    SlotBatch,
    SlotSpec,
    counter_normal,
    image_noise,
    image_seed,
    repaint_plan,
    sample,
    sample_progressive,
    spaced_timesteps,
    start_timestep,
    to_uint8,
)
from models.batch import KNOWN_NOISE_OFFSET
from models.samplers import step_coefficients
from tests.models.test_batch import run_mixed  # the same SCHED and SHAPE

SCHED = Schedule.from_config(DiffusionConfig())
T = SCHED.num_timesteps
SHAPE = (3, 16, 16)
KINDS = [SamplerKind.DDPM_SMALL, SamplerKind.DDIM, SamplerKind.DPMPP_2M]
MASK = torch.zeros(1, 16, 16)
MASK[:, 8:, :] = 1.0                 # generate the lower half, keep the upper
KEEP = MASK[0] == 0                  # [H, W]


def image(seed: int) -> torch.Tensor:
    """An input image in model space: smooth, so that it is not noise-like."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 4, 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")[0]


A, B = image(1), image(2)


def run(net, specs, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return sample(net, SCHED, specs, shape=SHAPE, **kw)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """`[C,H,W]` model space → `[H,W,C]` int 8-bit."""
    return to_uint8(x[None])[0].int()


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to the float noise of different batch compositions (as in test_batch)."""
    assert (a - b).abs().max().item() < 1e-4
    assert (pixels(a) - pixels(b)).abs().max().item() <= 1


# -- inpainting --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("jumps", [1, 2], ids=["plain", "resampled"])
def test_inpainting_keeps_the_known_region_exactly(net, kind: SamplerKind, jumps: int) -> None:
    spec = SlotSpec(seed=3, steps=4, kind=kind, init=A, mask=MASK, jump_length=2,
                    jump_n_sample=jumps)
    out = run(net, [spec])[0]
    got, want = pixels(out), pixels(A)
    assert torch.equal(got[KEEP], want[KEEP])
    # The generated half is the network's, not the input's.
    assert (got[~KEEP] - want[~KEEP]).abs().float().mean().item() > 10


def test_resampling_plan_length_and_progress(net) -> None:
    """4 steps, jumps of 1 at steps 0, 1 and 2 (the one at 0 goes back up from the clean
    image), each passed over once more: 4 + 2·1·1·3 = 10 steps; the slot finishes on its
    last one only, beside a slot without resampling. The net never sees t = −1."""
    def checked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert (t >= 0).all(), t
        return net(x, t)

    spec = SlotSpec(seed=3, steps=4, init=A, mask=MASK, jump_length=1, jump_n_sample=2)
    batch = SlotBatch(checked, SCHED, shape=SHAPE)
    batch.add([spec, SlotSpec(seed=3, steps=4, init=A, mask=MASK, jump_length=1)])
    assert batch.total_steps.tolist() == [10, 4]
    owner, finished_at = [0, 1], {}
    while len(batch):
        out = batch.step()
        for row in torch.nonzero(out.finished).flatten().tolist():
            finished_at[owner[row]] = int(out.steps_done[row])
        batch.keep(~out.finished)
        owner = [o for o, f in zip(owner, out.finished.tolist(), strict=True) if not f]
    assert finished_at == {0: 10, 1: 4}


def test_kept_region_follows_its_own_noise_stream_and_undo_is_q(net) -> None:
    """At every step of a resampled DDPM inpainting, the kept region of x_t is the input
    noised to t with the documented stream (counter + 2**40, not the sampler's), and each
    undo step is x_n = √(ᾱ_n/ᾱ_t) x_t + √(1 − ᾱ_n/ᾱ_t) z with the sampler's counter."""
    spec = SlotSpec(seed=8, index=2, steps=4, kind=SamplerKind.DDPM_SMALL, init=A, mask=MASK,
                    jump_length=1, jump_n_sample=2)
    plan = [*repaint_plan(4, T, 1, 2).tolist(), -1]
    key = torch.tensor([image_seed(8, 2)])
    f64 = torch.float64
    prev = counter_normal(key, torch.tensor([0]), SHAPE)[0].to(f64)   # x_T
    undos = 0
    for k, out in enumerate(sample_progressive(net, SCHED, [spec], shape=SHAPE)):
        x = out.x_t[0].to(f64)
        t, t_next = plan[k], plan[k + 1]
        ab = SCHED.alpha_bar(torch.tensor(t_next)).item()
        if t_next > t:
            ratio = ab / SCHED.alpha_bar(torch.tensor(t)).item()
            z = counter_normal(key, torch.tensor([k + 1]), SHAPE)[0].to(f64)
            assert (x - (ratio**0.5 * prev + (1 - ratio) ** 0.5 * z)).abs().max() < 1e-5
            undos += 1
        else:
            eps_k = counter_normal(key, torch.tensor([k + 1 + KNOWN_NOISE_OFFSET]), SHAPE)[0]
            known = ab**0.5 * A.to(f64) + (1 - ab) ** 0.5 * eps_k.to(f64)
            assert (x[:, KEEP] - known[:, KEEP]).abs().max() < 1e-5, (k, t_next)
        prev = x
    assert undos == 3 and k + 1 == len(plan) - 1


# -- img2img -----------------------------------------------------------------------------


def test_start_timestep() -> None:
    assert start_timestep(1.0, 1000) == 999
    assert start_timestep(0.5, 1000) == 499
    assert start_timestep(0.07, 100) == 6        # 0.07 · 100 = 7.000000000000001 in floats
    assert start_timestep(0.55, 100) == 54       # 55.00000000000001
    assert start_timestep(1e-9, 1000) == 0
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError):
            start_timestep(bad, 1000)


@pytest.mark.parametrize("kind", KINDS)
def test_img2img_at_the_lowest_strength_returns_the_input(net, kind: SamplerKind) -> None:
    """strength 1/T: t0 = 0, one step from √ᾱ_0 A + 0.01 ε; the result is A up to 0.01 of
    noise and of the network's ε: within 0.1 everywhere (13 of 255 levels), 0.02 on mean."""
    out = run(net, [SlotSpec(seed=4, steps=1, kind=kind, init=A, strength=1 / T)])[0]
    diff = (out - A).abs()
    assert diff.max().item() < 0.1 and diff.mean().item() < 0.02


@pytest.mark.parametrize("kind", KINDS)
def test_img2img_at_full_strength_is_plain_generation(net, kind: SamplerKind) -> None:
    plain = run(net, [SlotSpec(seed=5, steps=3, kind=kind)])[0]
    full = run(net, [SlotSpec(seed=5, steps=3, kind=kind, init=A, strength=1.0)])[0]
    assert torch.equal(full, plain)
    half = run(net, [SlotSpec(seed=5, steps=3, kind=kind, init=A, strength=0.5)])[0]
    assert (half - plain).abs().mean().item() > 0.05
    assert (half - A).abs().mean().item() > 0.05


def linear_alpha_bar(t: int) -> float:
    """ᾱ_t of the default linear schedule from its definition (β linear 1e-4…0.02 over T,
    ᾱ_t = ∏_{s ≤ t} (1 − β_s); ᾱ_{−1} = 1), in Python floats: not the schedule's tables."""
    betas = [1e-4 + (0.02 - 1e-4) * s / (T - 1) for s in range(T)]
    return math.prod(1.0 - b for b in betas[: t + 1])


# strength → t0 = ⌈s·T⌉ − 1, written out by hand for T = 1000.
START_CASES = [(0.5, 499), (0.07, 69), (0.3, 299), (0.0005, 0), (0.999, 998)]


@pytest.mark.parametrize(("strength", "t0"), START_CASES)
def test_img2img_and_interpolation_start_at_their_formula(net, strength: float,
                                                          t0: int) -> None:
    """The start state, absolutely: img2img x_t0 = √ᾱ_t0 A + √(1 − ᾱ_t0) ε, interpolation
    √ᾱ_t0 ((1 − λ) A + λ B) + √(1 − ᾱ_t0) ε, ε each slot's counter-0 noise; a plain slot in
    the same batch starts at its ε unchanged. The tolerance is far below the gap between t0
    and t0 − 1, which the test measures so that it cannot silently lose that resolution."""
    cfg = DiffusionConfig()
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, T) == ("linear", 1e-4, 0.02, 1000)
    specs = [SlotSpec(seed=11, index=0, steps=1, init=A, strength=strength),
             SlotSpec(seed=11, index=1, steps=1),
             SlotSpec(seed=12, index=3, steps=1, init=A, init_b=B, mix=0.3, strength=strength),
             SlotSpec(seed=12, index=4, steps=1, init=A, init_b=B, mix=1.0, strength=strength)]
    batch = SlotBatch(net, SCHED, shape=SHAPE)
    batch.add(specs)
    f64 = torch.float64
    eps = [image_noise(s.seed, s.index, 0, SHAPE).to(f64) for s in specs]

    def start(t: int, image: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        ab = linear_alpha_bar(t)
        return math.sqrt(ab) * image.to(f64) + math.sqrt(1.0 - ab) * e

    want = [start(t0, A, eps[0]), eps[1],
            start(t0, 0.7 * A + 0.3 * B, eps[2]), start(t0, B, eps[3])]
    tol = 1e-6   # float32 rounding is ~3e-7 here
    for i, w in enumerate(want):
        assert (batch.x[i].to(f64) - w).abs().max().item() < tol, (i, strength)
    # Where an off-by-one start would be (t0 − 1; −1 is the input itself): far outside.
    gap = (start(t0 - 1, A, eps[0]) - want[0]).abs().max().item()
    assert gap > 20 * tol, gap


def test_steps_are_spread_below_the_start(net) -> None:
    batch = SlotBatch(net, SCHED, shape=SHAPE)
    batch.add([SlotSpec(seed=0, steps=4, init=A, strength=0.5)])
    assert batch.plans[0, :5].tolist() == [*spaced_timesteps(4, 500).tolist(), -1]
    with pytest.raises(ValueError, match=r"steps .*must be in 1\.\.500"):
        batch.add([SlotSpec(seed=0, steps=501, init=A, strength=0.5)])
    assert len(batch) == 1


# -- interpolation -----------------------------------------------------------------------


def frame(mix: float, **kw: object) -> SlotSpec:
    return SlotSpec(seed=6, index=0, steps=2, init=A, init_b=B, mix=mix, strength=0.6, **kw)


@pytest.mark.parametrize("kind", [SamplerKind.DDIM, SamplerKind.DDPM_LARGE])
def test_interpolation_ends_are_img2img_of_each_image(net, kind: SamplerKind) -> None:
    a = run(net, [SlotSpec(seed=6, steps=2, kind=kind, init=A, strength=0.6)])[0]
    b = run(net, [SlotSpec(seed=6, steps=2, kind=kind, init=B, strength=0.6)])[0]
    assert torch.equal(run(net, [frame(0.0, kind=kind)])[0], a)
    assert torch.equal(run(net, [frame(1.0, kind=kind)])[0], b)
    middle = run(net, [frame(0.5, kind=kind)])[0]
    for end in (a, b):    # 2–4 levels of 255 on average here; a and b differ by 5–7
        assert (pixels(middle) - pixels(end)).abs().float().mean().item() > 1.0


# -- batch invariance --------------------------------------------------------------------


def test_mixed_conditioned_batch_equals_each_image_alone(make_net) -> None:
    net = make_net(seed=3, num_classes=3)
    mask2 = torch.zeros(1, 16, 16)
    mask2[:, :, :5] = 1.0
    specs = [
        SlotSpec(seed=1, steps=4, kind=SamplerKind.DDIM, label=2, guidance=3.0),
        SlotSpec(seed=2, steps=5, kind=SamplerKind.DPMPP_2M, label=0, init=A, strength=0.6),
        SlotSpec(seed=3, steps=4, kind=SamplerKind.DDPM_SMALL, label=1, guidance=2.0, init=B,
                 mask=MASK, jump_length=2, jump_n_sample=2),
        SlotSpec(seed=4, steps=5, kind=SamplerKind.DPMPP_2M, init=A, mask=mask2,
                 jump_length=2, jump_n_sample=2),
        SlotSpec(seed=5, steps=3, kind=SamplerKind.DDIM, eta=0.5, init=A, init_b=B, mix=0.3,
                 strength=0.7, label=1, guidance=2.0),
        SlotSpec(seed=6, steps=3, kind=SamplerKind.DDPM_LARGE, init=B, strength=0.3),
    ]
    kw = {"num_classes": 3}
    alone = {i: run(net, [s], **kw)[0] for i, s in enumerate(specs)}
    mixed = run_mixed(net, specs, admit_at=[0, 0, 1, 2, 2, 4], **kw)
    for i in alone:
        assert_same_images(mixed[i], alone[i])
    for i, m in ((2, MASK), (3, mask2)):
        keep = m[0] == 0
        assert torch.equal(pixels(mixed[i])[keep], pixels(specs[i].init)[keep])  # type: ignore[arg-type]
    # Another seed is another image (the noise, not the input, decides the generated part).
    other = run(net, [SlotSpec(seed=30, steps=4, kind=SamplerKind.DDPM_SMALL, label=1,
                               guidance=2.0, init=B, mask=MASK, jump_length=2,
                               jump_n_sample=2)], **kw)[0]
    assert (other - alone[2])[:, ~KEEP].abs().mean().item() > 0.05


# -- plans and coefficients --------------------------------------------------------------


def test_repaint_plan_is_diffusers_repaint_walk() -> None:
    """diffusers' RePaintScheduler lists "leading" timesteps v·T/S at which it calls the net
    (denoising, when v is below the previous entry) or undoes one step (v above it, taking
    the sample from step v − 2 to v − 1). Our plan lists the timesteps the sample visits.
    - With S = T both spacings are 0..T−1, so the walks must agree exactly: ours is
      [T−1] + [v − 1 for every entry but the last] (after entry v the sample is at v − 1).
    - With T = 1000, S = 20 the spacings differ (diffusers step k is at 50k, ours at
      50k + 49, "trailing"), so we compare the walk in steps: direction of every transition,
      and the step number of every denoising transition (the net's timestep)."""
    repaint = pytest.importorskip("diffusers.schedulers.scheduling_repaint")
    s = repaint.RePaintScheduler(num_train_timesteps=20)
    s.set_timesteps(20, jump_length=5, jump_n_sample=3)
    ours = repaint_plan(20, 20, 5, 3)
    assert ours.tolist() == [19, *(s.timesteps[:-1] - 1).tolist()]

    s = repaint.RePaintScheduler(num_train_timesteps=1000)
    s.set_timesteps(20, jump_length=5, jump_n_sample=3)
    theirs = (s.timesteps // 50).tolist()
    ours = repaint_plan(20, 1000, 5, 3)
    assert len(ours) == len(theirs) == 20 + 2 * 5 * 2 * 3        # 3 jumps: at 0, 5, 10
    steps = (torch.cat([ours, torch.tensor([-1])]) + 1) // 50 - 1  # timestep → step (−1: clean)
    down_ours = (steps[1:] < steps[:-1]).tolist()
    down_theirs = [True, *(b < a for a, b in itertools.pairwise(theirs))]
    assert down_ours == down_theirs and down_ours.count(False) == 30
    assert [k for k, d in zip(steps[:-1].tolist(), down_ours, strict=True) if d] == \
        [v for v, d in zip(theirs, down_theirs, strict=True) if d]
    # No resampling: the plain plan; below a jump's length: no jumps.
    assert torch.equal(repaint_plan(20, 1000, 5, 1), spaced_timesteps(20, 1000))
    assert torch.equal(repaint_plan(4, 1000, 5, 3), spaced_timesteps(4, 1000))


def test_undo_coefficients_are_the_forward_process() -> None:
    """t → n > t: q(x_n | x_t) = N(√(∏ α) x_t, (1 − ∏ α) I), ∏ over t+1..n, whatever the
    sampler; from the clean image (t = −1) it is q(x_n | x_0)."""
    t = torch.tensor([499, 499, 499, 499, -1, 100])
    n = torch.tensor([549, 549, 549, 549, 166, 101])
    kind = torch.tensor([0, 1, 2, 3, 3, 2])
    coefs = step_coefficients(SCHED, kind, t, n, torch.tensor([549, -1, 549, 549, 0, 101]),
                              torch.full((6,), 0.7, dtype=torch.float64))
    alphas = 1 - SCHED.betas
    prod = torch.stack([alphas[a + 1:b + 1].prod() for a, b in zip(t.tolist(), n.tolist(),
                                                                    strict=True)])
    assert torch.allclose(coefs.a, prod.sqrt(), rtol=1e-10)
    assert torch.allclose(coefs.sigma, (1 - prod).sqrt(), rtol=1e-8)
    assert not coefs.b.any() and not coefs.c.any()


def test_dpm_solver_is_first_order_after_an_undo() -> None:
    """The step after an undo (previous entry below t) must not use the previous x̂0: it
    belongs to the trajectory before the jump. Same coefficients as a first step."""
    kind = torch.tensor([3, 3, 3])
    t, n = torch.tensor([549, 549, 549]), torch.tensor([499, 499, 499])
    eta = torch.zeros(3, dtype=torch.float64)
    coefs = step_coefficients(SCHED, kind, t, n, torch.tensor([499, -1, 599]), eta)
    assert coefs.c[0] == 0 and coefs.c[2] != 0
    assert coefs.a[0] == coefs.a[1] and coefs.b[0] == coefs.b[1]


# -- validation --------------------------------------------------------------------------


def test_bad_conditioning_is_refused(net) -> None:
    for bad in (dict(strength=0.0), dict(strength=1.5), dict(init=A, strength=float("nan")),
                dict(mask=MASK), dict(init_b=B), dict(strength=0.5),
                dict(init=A, mask=MASK, init_b=B), dict(init=A, init_b=B, mix=1.5),
                dict(init=A, mix=0.5), dict(init=A, mask=MASK, jump_length=0),
                dict(init=A, mask=MASK, jump_n_sample=0), dict(init=A, mask=MASK * 2),
                dict(init=A, mask=MASK[0]), dict(init=A[0])):
        with pytest.raises(ValueError):
            SlotSpec(seed=0, **bad)  # type: ignore[arg-type]
    batch = SlotBatch(net, SCHED, shape=SHAPE)
    batch.add([SlotSpec(seed=0, steps=3)])
    for bad_spec in (SlotSpec(seed=1, init=A[:1]), SlotSpec(seed=1, init=A, init_b=B[:, :8]),
                     SlotSpec(seed=1, init=A, mask=MASK[:, :8])):
        with pytest.raises(ValueError, match="shape"):
            batch.add([SlotSpec(seed=2, steps=4), bad_spec])
        assert len(batch) == 1 and batch.x.shape[0] == 1 and batch.known.shape[0] == 1
