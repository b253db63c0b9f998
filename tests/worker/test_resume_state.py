"""A job interrupted at any engine step and resumed in a new Engine, through the stored
bytes, makes the same frames from the cut on as an uninterrupted run, bit for bit.

Done images are not redone, running ones continue at their step, waiting ones start as
they would have; progress (steps done, each image's steps) and the frame plan continue
without a duplicate or a missing snapshot. No Redis: the engine and the codec alone.
The network runs row by row (tests/models/test_resume.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from contract.resume import ResumeStateError, state_bytes
from contract.spec import GenerationSpec
from models import Checkpoint, Schedule, UNet, preset
from models.resume import SlotState
from tests.models.test_resume import RowWise
from worker.engine import Engine, JobResume, LoadedModel
from worker.resume import decode, encode

SIZE = 16
DIGEST = "sha256:" + "0" * 64


def micro(name: str, seed: int = 0, **changes: Any) -> LoadedModel:
    """A resident one-level 8-channel UNet (row-wise), no files."""
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(ch=8, ch_mult=(1,), attn_resolutions=(), norm_groups=4,
                                 **changes)
    net = RowWise(UNet(cfg.unet).eval())
    ck = Checkpoint(net=net, config=cfg, schedule=Schedule.from_config(cfg.diffusion),
                    path=Path("."))
    return LoadedModel.from_checkpoint(name, ck, 0.0)


MODELS = {"micro": micro("micro"), "cond": micro("cond", seed=3, num_classes=4)}


def image(seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 4, 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")[0]


MASK = torch.zeros(1, SIZE, SIZE)
MASK[:, :, 8:] = 1.0
INPUTS = {"init_image": image(1), "mask": MASK, "interpolate_to": image(2)}

# Admission order; 11 images on 5 slots of two models: at most cuts some images are done,
# some running, some waiting.
JOBS: dict[str, GenerationSpec] = {
    "dpm": GenerationSpec(model="micro", num_images=3, steps=6, seed=1, sampler="dpm++2m",
                          snapshot_every=2),
    "ddpm": GenerationSpec(model="micro", num_images=2, steps=5, seed=2, sampler="ddpm",
                           snapshot_every=1, snapshot_kind="xt"),
    "paint": GenerationSpec(model="micro", steps=4, seed=3, sampler="ddim", eta=0.5,
                            init_image=DIGEST, mask=DIGEST, jump_length=1, jump_n_sample=2,
                            snapshot_every=3),
    "guided": GenerationSpec(model="cond", steps=5, seed=4, sampler="dpm++2m", class_label=1,
                             guidance_scale=2.5, snapshot_every=2, snapshot_size=8),
    "interp": GenerationSpec(model="micro", num_images=3, steps=4, seed=5, sampler="ddpm",
                             init_image=DIGEST, interpolate_to=DIGEST),
    "img2img": GenerationSpec(model="micro", steps=3, seed=6, sampler="ddim",
                              init_image=DIGEST, strength=0.6, snapshot_every=1),
}
MAX_BATCH = 5


def inputs_of(spec: GenerationSpec) -> dict[str, Tensor] | None:
    return {k: INPUTS[k] for k in spec.inputs} or None


def engine(max_batch: int = MAX_BATCH) -> Engine:
    return Engine(MODELS, device="cpu", max_batch=max_batch)


@dataclass
class Step:
    """What one engine step reported, in a comparable form."""

    frames: dict[tuple[str, int, int, bool], Tensor] = field(default_factory=dict)
    progress: list[tuple[str, int, int, bool, tuple[int, ...]]] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)


def step(eng: Engine) -> Step:
    report = eng.step()
    out = Step(slots=dict(report.slots))
    for f in report.frames:
        key = (f.job_id, f.index, f.step, f.final)
        assert key not in out.frames, f"two frames {key} in one step"
        assert f.plan is eng.jobs[f.job_id].plan if f.job_id in eng.jobs else True
        out.frames[key] = f.pixels.clone()
    out.progress = sorted((p.job_id, p.steps_done, p.images_done, p.done,
                           tuple(p.image_steps)) for p in report.progress)
    return out


def drain(eng: Engine, limit: int = 200) -> list[Step]:
    steps = []
    while eng.jobs:
        assert len(steps) < limit, "the engine never finished"
        steps.append(step(eng))
    return steps


def admit_all(eng: Engine) -> None:
    for job_id, s in JOBS.items():
        eng.admit(job_id, s, inputs_of(s))


def carry_over(old: Engine, max_batch: int = MAX_BATCH) -> Engine:
    """A new engine holding `old`'s jobs as their stored bytes say (encode → decode)."""
    states = old.exports(list(old.jobs))
    new = engine(max_batch)
    for job_id, state in states.items():
        s = JOBS[job_id]
        info = MODELS[s.model].info
        data = encode(state, s, info)
        assert len(data) <= state_bytes(s, info)
        new.admit(job_id, s, inputs_of(s), resume=decode(data, s, info))
        a, b = old.jobs[job_id], new.jobs[job_id]
        assert (b.steps_done, b.finished, b.image_steps()) == \
            (a.steps_done, a.finished, a.image_steps()), job_id
    assert new.active + new.waiting == old.active + old.waiting
    return new


def assert_same_steps(got: list[Step], want: list[Step], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} steps, not {len(want)}"
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert sorted(g.frames) == sorted(w.frames), f"{what}: frames of step {k}"
        for key, px in w.frames.items():
            assert torch.equal(g.frames[key], px), f"{what}: pixels of {key} at step {k}"
        assert g.progress == w.progress, f"{what}: progress of step {k}"
        assert g.slots == w.slots, f"{what}: slots of step {k}"


@pytest.fixture(scope="module")
def reference() -> list[Step]:
    eng = engine()
    admit_all(eng)
    return drain(eng)


def test_the_reference_run_has_every_kind_of_cut(reference: list[Step]) -> None:
    """Some cut has done, running and waiting images of one job at once, and every job's
    frames are there once: the cuts below are not trivial."""
    eng = engine()
    admit_all(eng)
    mixed = 0
    for _ in range(len(reference) - 1):
        eng.step()
        for state in eng.exports(list(eng.jobs)).values():
            job_images = len(state.done) + len(state.running)
            mixed += bool(state.done and state.running) and job_images < 3
    assert mixed
    finals = [k for s in reference for k in s.frames if k[3]]
    assert sorted((j, i) for j, i, _, _ in finals) == \
        sorted((j, i) for j, s in JOBS.items() for i in range(s.num_images))


def test_resumed_at_any_step_in_a_new_engine_the_frames_are_the_same(
        reference: list[Step]) -> None:
    """One engine runs the jobs; after every step its state goes into a new engine that
    finishes them (exporting changes nothing: the first engine's run stays the reference)."""
    eng = engine()
    admit_all(eng)
    before: list[Step] = []
    for cut in range(len(reference)):
        states = eng.exports(list(eng.jobs))
        finals_before = {(j, i) for s in before for (j, i, _, final) in s.frames if final}
        for job_id, state in states.items():
            assert {(job_id, i) for i in state.done} == \
                {(j, i) for j, i in finals_before if j == job_id}, f"cut {cut}: done"
        after = drain(carry_over(eng))
        assert_same_steps(after, reference[cut:], f"cut {cut}, after")
        before.append(step(eng))
    assert not eng.jobs
    assert_same_steps(before, reference, "the exporting engine")


def test_resumed_after_every_step_again_and_again(reference: list[Step]) -> None:
    """Each step in a new engine made from the last one's state: held images, resumed
    states of resumed jobs, done images carried across many engines."""
    eng = engine()
    admit_all(eng)
    got = []
    while eng.jobs:
        got.append(step(eng))
        if eng.jobs:
            eng = carry_over(eng)
    assert_same_steps(got, reference, "chained")


def test_a_smaller_engine_holds_resumed_images_until_slots_free(reference: list[Step]) -> None:
    """Resumed images that do not all fit wait holding their state (and count their steps;
    a state exported then holds them too), then finish to the same pixels."""
    eng = engine()
    admit_all(eng)
    for _ in range(3):
        step(eng)
    small = carry_over(eng, max_batch=2)
    assert small.active == 0 and small.waiting == eng.active + eng.waiting
    got = [step(small)]
    assert any(j.held for j in small.jobs.values()), "no image waits holding its state"
    small = carry_over(small, max_batch=2)   # held states travel on
    got += drain(small)
    finals = {k: px for s in got for k, px in s.frames.items() if k[3]}
    want = {k: px for s in reference[3:] for k, px in s.frames.items() if k[3]}
    assert sorted(finals) == sorted(want)
    assert all(torch.equal(finals[k], want[k]) for k in want)
    assert all(sum(s.slots.values()) <= 2 for s in got)


def test_resumed_images_take_their_slots_before_new_ones() -> None:
    """A job's running images go on at the first step of the new engine, before the
    waiting image of another job (as they would have: they held those slots)."""
    a = GenerationSpec(model="micro", num_images=3, steps=4, seed=1)
    b = GenerationSpec(model="micro", num_images=1, steps=4, seed=2)
    eng = engine(max_batch=3)
    eng.admit("a", a)
    eng.step()
    eng.admit("b", b)
    states = eng.exports(["a", "b"])
    assert len(states["a"].running) == 3 and not states["b"].running
    new = engine(max_batch=3)
    new.admit("a", a, resume=states["a"])
    new.admit("b", b, resume=states["b"])
    report = new.step()
    assert new.jobs["a"].image_steps() == [2, 2, 2] and new.jobs["b"].image_steps() == [0]
    assert [p.job_id for p in report.progress] == ["a"]


def test_states_that_cannot_continue_are_refused() -> None:
    eng = engine()
    s = JOBS["dpm"]
    eng.admit("j", s)
    for _ in range(2):
        eng.step()
    good = eng.export("j")
    assert sorted(good.running) == [0, 1, 2] and good.done == frozenset()
    st = good.running[0]
    bad = {
        "overlap": JobResume(done=frozenset({0}), running=good.running),
        "index": JobResume(running={3: st}),
        "all done": JobResume(done=frozenset({0, 1, 2})),
        "past the end": JobResume(running={0: SlotState(pos=6, x=st.x, x0_prev=st.x0_prev)}),
        "no x0_prev": JobResume(running={0: SlotState(pos=2, x=st.x)}),
    }
    fresh = engine()
    for what, state in bad.items():
        with pytest.raises(ValueError):
            fresh.admit("j", s, resume=state)
        assert fresh.jobs == {} and fresh.waiting == 0, what
    with pytest.raises(KeyError):
        eng.export("never-admitted")
    fresh.admit("j", s, resume=good)
    assert fresh.waiting == 3 and fresh.jobs["j"].steps_done == 6


def test_the_stored_bytes_refuse_another_job_or_model() -> None:
    eng = engine()
    s = JOBS["dpm"]
    eng.admit("j", s)
    eng.step()
    eng.step()
    state = eng.export("j")
    info = MODELS["micro"].info
    data = encode(state, s, info)
    back = decode(data, s, info)
    assert back.done == state.done and sorted(back.running) == sorted(state.running)
    for i, st in state.running.items():
        assert back.running[i].pos == st.pos and torch.equal(back.running[i].x, st.x)
        assert (back.running[i].x0_prev is None) == (st.x0_prev is None)
        if st.x0_prev is not None:
            assert torch.equal(back.running[i].x0_prev, st.x0_prev)  # type: ignore[arg-type]
    others = {
        "seed": (s.model_copy(update={"seed": 9}), info),
        "steps": (s.model_copy(update={"steps": 7}), info),
        "image_size": (s, MODELS["micro"].info.__class__(**{**info.__dict__,
                                                            "image_size": 32})),
        "in_channels": (s, info.__class__(**{**info.__dict__, "in_channels": 1})),
        "another request": (s.model_copy(update={"snapshot_every": 3}), info),
    }
    for what, (spec, model) in others.items():
        with pytest.raises(ResumeStateError, match=what):
            decode(data, spec, model)
    for damaged in (data[:-1], data + b"\0", b"nope" + data[4:], data[:10]):
        with pytest.raises(ResumeStateError):
            decode(damaged, s, info)
