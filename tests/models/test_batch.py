"""Continuous batching math: an image must not depend on what shares its batch."""

from __future__ import annotations

import pytest
import torch

from models import DiffusionConfig, SamplerKind, Schedule, SlotBatch, SlotSpec, sample, to_uint8

SCHED = Schedule.from_config(DiffusionConfig())
SHAPE = (3, 16, 16)

SPECS = [
    SlotSpec(seed=1, index=0, steps=10, kind=SamplerKind.DDIM),
    SlotSpec(seed=2, index=3, steps=7, kind=SamplerKind.DPMPP_2M),
    SlotSpec(seed=3, index=0, steps=12, kind=SamplerKind.DDPM_LARGE),
    SlotSpec(seed=4, index=1, steps=9, kind=SamplerKind.DDIM, eta=0.5),
    SlotSpec(seed=5, index=2, steps=5, kind=SamplerKind.DDPM_SMALL),
]


def run_mixed(net, specs, admit_at, **kw) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Admit spec i before step admit_at[i], retire slots as they finish; final x per spec."""
    batch = SlotBatch(net, SCHED, shape=SHAPE, **kw)
    owner: list[int] = []        # spec index of each row
    done: dict[int, torch.Tensor] = {}
    step = 0
    while len(done) < len(specs):
        new = [i for i, a in enumerate(admit_at) if a == step]
        batch.add([specs[i] for i in new])
        owner += new
        if len(batch):
            out = batch.step()
            for row in torch.nonzero(out.finished).flatten().tolist():
                done[owner[row]] = out.x_t[row]
            batch.keep(~out.finished)
            owner = [o for o, f in zip(owner, out.finished.tolist(), strict=True) if not f]
        step += 1
    return done


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() < 1e-4
    pa, pb = to_uint8(a[None]).int(), to_uint8(b[None]).int()
    assert (pa - pb).abs().max().item() <= 1


def test_mixed_timestep_batch_equals_each_sample_alone(net) -> None:
    alone = {i: sample(net, SCHED, [s], shape=SHAPE)[0] for i, s in enumerate(SPECS)}
    mixed = run_mixed(net, SPECS, admit_at=[0, 3, 3, 5, 11])
    # Some slots ran beside others at different positions of different plans.
    assert set(mixed) == set(alone)
    for i in alone:
        assert_same_images(mixed[i], alone[i])


def test_images_do_not_depend_on_batch_size(net) -> None:
    specs = [SlotSpec(seed=9, index=i, steps=6, kind=SamplerKind.DDPM_LARGE) for i in range(4)]
    together = sample(net, SCHED, specs, shape=SHAPE)
    one_by_one = torch.cat([sample(net, SCHED, [s], shape=SHAPE) for s in specs])
    for a, b in zip(together, one_by_one, strict=True):
        assert_same_images(a, b)
    assert (together[0] - together[1]).abs().max() > 1e-2  # different images per index


def test_guided_and_unguided_conditional_slots_mix(make_net) -> None:
    net = make_net(seed=3, num_classes=3)
    specs = [
        SlotSpec(seed=1, steps=6, kind=SamplerKind.DDIM, label=2, guidance=3.0),
        SlotSpec(seed=2, steps=8, kind=SamplerKind.DPMPP_2M, label=0),
        SlotSpec(seed=3, steps=5, kind=SamplerKind.DDIM),          # unconditional sample
        SlotSpec(seed=4, steps=7, kind=SamplerKind.DDPM_SMALL, label=1, guidance=0.0),
    ]
    kw = {"num_classes": 3}
    alone = {i: sample(net, SCHED, [s], shape=SHAPE, **kw)[0] for i, s in enumerate(specs)}
    mixed = run_mixed(net, specs, admit_at=[0, 1, 2, 2], **kw)
    for i in alone:
        assert_same_images(mixed[i], alone[i])
    # Guidance changes the image, and scale 0 is the unconditional prediction.
    unguided = sample(net, SCHED, [SlotSpec(seed=1, steps=6, kind=SamplerKind.DDIM, label=2)],
                      shape=SHAPE, **kw)[0]
    assert (unguided - alone[0]).abs().max() > 1e-3
    uncond = sample(net, SCHED, [SlotSpec(seed=4, steps=7, kind=SamplerKind.DDPM_SMALL)],
                    shape=SHAPE, **kw)[0]
    assert_same_images(uncond, alone[3])


def test_step_reports_progress_and_finishes_each_slot_on_its_own_step(net) -> None:
    batch = SlotBatch(net, SCHED, shape=SHAPE)
    batch.add([SlotSpec(seed=0, steps=2), SlotSpec(seed=0, index=1, steps=4)])
    first = batch.step()
    assert first.steps_done.tolist() == [1, 1] and first.finished.tolist() == [False, False]
    second = batch.step()
    assert second.finished.tolist() == [True, False]
    batch.keep(~second.finished)
    assert len(batch) == 1 and batch.total_steps.tolist() == [4]
    batch.step()
    last = batch.step()
    assert last.finished.tolist() == [True] and last.steps_done.tolist() == [4]
    assert last.x0.shape == last.x_t.shape == (1, *SHAPE)


def test_bad_slots_are_refused_and_leave_the_batch_unchanged(net, make_net) -> None:
    batch = SlotBatch(make_net(num_classes=3), SCHED, shape=SHAPE, num_classes=3)
    batch.add([SlotSpec(seed=0, steps=3, label=1)])
    for bad in (SlotSpec(seed=1, label=3), SlotSpec(seed=1, label=-1), SlotSpec(seed=1, steps=0),
                SlotSpec(seed=1, steps=1001)):
        with pytest.raises(ValueError):
            batch.add([SlotSpec(seed=2, steps=4), bad])
        assert len(batch) == 1 and batch.x.shape[0] == 1
    with pytest.raises(ValueError, match="out of range"):
        SlotBatch(net, SCHED, shape=SHAPE).add([SlotSpec(seed=0, label=0)])
    with pytest.raises(ValueError, match="eta"):
        SlotSpec(seed=0, eta=float("nan"))
