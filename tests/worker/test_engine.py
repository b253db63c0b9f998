"""The continuous-batching engine on the CPU with tiny random models.

An image must come out the same (to one 8-bit level) whatever shares its batch, whenever it
was admitted, and whatever happened to the jobs beside it (canceled, out of memory).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from contract.frame_plan import FramePlan
from contract.spec import GenerationSpec
from models import Checkpoint, ModelConfig, Schedule, UNet, preset
from worker.engine import Engine, EngineJob, LoadedModel, StepReport, snapshot_due

SIZE = 16   # the tiny preset's image size


def loaded(name: str = "tiny", seed: int = 0, cfg: ModelConfig | None = None,
           **changes: Any) -> LoadedModel:
    """A resident random `tiny` model (no files): `changes` edit its UNet config."""
    torch.manual_seed(seed)
    cfg = (cfg or preset("tiny")).replace(**changes)
    net = UNet(cfg.unet).eval()
    ck = Checkpoint(net=net, config=cfg, schedule=Schedule.from_config(cfg.diffusion),
                    path=Path("."))
    return LoadedModel.from_checkpoint(name, ck, 0.0)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return loaded()


@pytest.fixture(scope="module")
def cond() -> LoadedModel:
    return loaded("cond", seed=3, num_classes=10)


def make_engine(*models: LoadedModel, max_batch: int = 8, **kw: Any) -> Engine:
    return Engine({m.name: m for m in models}, device="cpu", max_batch=max_batch, **kw)


def spec(model: str = "tiny", **kw: Any) -> GenerationSpec:
    kw.setdefault("steps", 6)
    kw.setdefault("seed", 1)
    return GenerationSpec(model=model, **kw)


@dataclass
class Run:
    """Everything an engine reported, frame by frame."""

    finals: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    final_steps: dict[tuple[str, int], int] = field(default_factory=dict)
    snapshots: dict[tuple[str, int, int], Tensor] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)
    reports: list[StepReport] = field(default_factory=list)

    def step(self, engine: Engine) -> StepReport:
        report = engine.step()
        self.reports.append(report)
        for f in report.frames:
            assert f.pixels.dtype == torch.uint8
            assert f.pixels.shape == (SIZE, SIZE, 3)
            if f.final:
                assert (f.job_id, f.index) not in self.finals, "two final frames for one image"
                self.finals[f.job_id, f.index] = f.pixels.clone()
                self.final_steps[f.job_id, f.index] = f.step
            else:
                key = (f.job_id, f.index, f.step)
                assert key not in self.snapshots, "two snapshots for one step"
                self.snapshots[key] = f.pixels.clone()
        self.completed += report.completed
        return report

    def drain(self, engine: Engine, max_steps: int = 200) -> Run:
        for _ in range(max_steps):
            if not engine.jobs:
                return self
            self.step(engine)
        raise AssertionError(f"engine still has jobs after {max_steps} steps")

    def images(self, job_id: str) -> dict[int, Tensor]:
        return {i: px for (j, i), px in self.finals.items() if j == job_id}


def alone(model: LoadedModel, s: GenerationSpec) -> dict[int, Tensor]:
    """Final pixels of `s` run by itself in a fresh engine."""
    eng = make_engine(model)
    eng.admit("ref", s)
    return Run().drain(eng).images("ref")


def max_diff(a: Tensor, b: Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def assert_same(a: dict[int, Tensor], b: dict[int, Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for i in a:
        assert max_diff(a[i], b[i]) <= 1, f"image {i} differs by {max_diff(a[i], b[i])} levels"


# ---------------------------------------------------------------------------------------
# One job.


def test_job_yields_one_final_frame_per_image(tiny: LoadedModel) -> None:
    eng = make_engine(tiny)
    job = eng.admit("j", spec(num_images=3, steps=5, sampler="ddpm"))
    assert isinstance(job, EngineJob)
    assert (eng.active, eng.waiting) == (0, 3)
    run = Run().drain(eng)

    finals = [f for r in run.reports for f in r.frames if f.final]
    assert len(finals) == 3
    assert sorted(f.index for f in finals) == [0, 1, 2]
    assert all(f.job_id == "j" and f.step == 5 for f in finals)
    assert not [f for r in run.reports for f in r.frames if not f.final]   # no snapshots asked
    assert len(run.reports) == 5
    assert all(r.progressed == ["j"] and r.slots == {"tiny": 3} for r in run.reports)
    assert run.completed == ["j"]
    assert [r.completed for r in run.reports][:-1] == [[]] * 4
    assert eng.jobs == {}
    assert (eng.active, eng.waiting) == (0, 0)
    assert eng.has_room()
    assert job.done and job.finished == 3 and job.running == 0
    assert job.steps_done == job.total_steps == 15
    # Each index is its own image.
    imgs = run.images("j")
    assert max_diff(imgs[0], imgs[1]) > 10 and max_diff(imgs[1], imgs[2]) > 10


def test_same_spec_gives_same_pixels_and_seed_matters(tiny: LoadedModel) -> None:
    s = spec(num_images=2, steps=4, seed=11, sampler="dpm++2m")
    a, b = alone(tiny, s), alone(tiny, s)
    assert all(torch.equal(a[i], b[i]) for i in a)
    other = alone(tiny, s.model_copy(update={"seed": 12}))
    assert all(max_diff(a[i], other[i]) > 10 for i in a)


def test_sampler_and_eta_of_the_spec_are_used(tiny: LoadedModel) -> None:
    variants = {
        "ddim": {"sampler": "ddim"},
        "ddim-eta": {"sampler": "ddim", "eta": 1.0},
        "ddpm": {"sampler": "ddpm"},
        "dpm": {"sampler": "dpm++2m"},
    }
    eng = make_engine(tiny)
    for job_id, kw in variants.items():
        eng.admit(job_id, spec(num_images=1, steps=5, seed=3, **kw))
    run = Run().drain(eng)
    imgs = {job_id: run.images(job_id)[0] for job_id in variants}
    names = list(imgs)
    for k, a in enumerate(names):
        for b in names[k + 1:]:
            assert max_diff(imgs[a], imgs[b]) > 5, f"{a} and {b} gave the same image"


# ---------------------------------------------------------------------------------------
# Batch invariance and admission.

TARGET = GenerationSpec(model="tiny", num_images=3, steps=8, seed=7, sampler="ddim")


def test_image_does_not_depend_on_what_shares_the_batch(tiny: LoadedModel) -> None:
    others = {
        "o1": spec(num_images=2, steps=10, seed=1, sampler="ddpm"),
        "o2": spec(num_images=1, steps=6, seed=2, sampler="dpm++2m"),
        "o3": spec(num_images=2, steps=12, seed=3, sampler="ddim", eta=0.5),
    }
    eng = make_engine(tiny, max_batch=16)
    run = Run()
    eng.admit("o1", others["o1"])
    eng.admit("o2", others["o2"])
    run.step(eng)
    run.step(eng)
    eng.admit("x", TARGET)                    # joins two jobs at steps 2 of 10 and 6
    for _ in range(3):
        run.step(eng)
    eng.admit("o3", others["o3"])             # and is joined three steps later
    run.drain(eng)

    # The target really shared its batch with other jobs at other timesteps.
    assert max(r.slots["tiny"] for r in run.reports if "x" in r.progressed) >= 3 + 3
    assert sorted(run.completed) == ["o1", "o2", "o3", "x"]
    ref = alone(tiny, TARGET)
    assert_same(run.images("x"), ref)
    for job_id, s in others.items():
        assert_same(run.images(job_id), alone(tiny, s))
    # ...and the comparison can fail: another seed is another image.
    other_seed = alone(tiny, TARGET.model_copy(update={"seed": 8}))
    assert all(max_diff(ref[i], other_seed[i]) > 10 for i in ref)


def test_small_job_starts_at_the_next_step_and_finishes_first(tiny: LoadedModel) -> None:
    eng = make_engine(tiny, max_batch=8)
    run = Run()
    big = eng.admit("big", spec(num_images=6, steps=30, seed=1, sampler="ddim"))
    for _ in range(3):
        run.step(eng)
    assert eng.active == 6 and eng.has_room()
    small_spec = spec(num_images=1, steps=5, seed=2, sampler="dpm++2m")
    small = eng.admit("small", small_spec)
    assert eng.waiting == 1 and small.running == 0 and small.steps_done == 0

    report = run.step(eng)
    assert small.running == 1
    assert small.steps_done == 1
    assert report.slots == {"tiny": 7}
    assert "small" in report.progressed and "big" in report.progressed
    assert eng.waiting == 0

    run.drain(eng)
    assert run.completed == ["small", "big"]
    done_at = {j: k for k, r in enumerate(run.reports) for j in r.completed}
    assert done_at["small"] == 3 + 5 - 1       # admitted after step 3, five steps long
    assert done_at["big"] == 30 - 1
    assert big.steps_done == 6 * 30
    assert_same(run.images("small"), alone(tiny, small_spec))


def test_full_engine_starts_the_fewest_running_job_first(tiny: LoadedModel) -> None:
    eng = make_engine(tiny, max_batch=4)
    assert eng.has_room()
    long = eng.admit("long", spec(num_images=1, steps=12, seed=1))
    assert eng.waiting == 1 and eng.has_room()
    big = eng.admit("big", spec(num_images=6, steps=3, seed=2))
    assert eng.waiting == 7 and not eng.has_room()

    run = Run()
    run.step(eng)                   # long: 1 slot, big: 3 slots, 3 images of big wait
    assert (long.running, big.running, len(big.waiting)) == (1, 3, 3)
    assert (eng.active, eng.waiting) == (4, 3)
    small = eng.admit("small", spec(num_images=1, steps=3, seed=3))
    assert eng.waiting == 4 and not eng.has_room()

    run.step(eng)
    run.step(eng)                   # big's three running images finish: three slots free
    assert big.finished == 3 and big.running == 0
    assert (eng.active, eng.waiting) == (1, 4)

    run.step(eng)
    # Three free slots, four waiting images: the small job (0 running) must get one even
    # though the big job was admitted before it; FIFO would have given all three to big.
    assert small.running == 1 and small.steps_done == 1
    assert big.running == 2 and len(big.waiting) == 1
    assert (eng.active, eng.waiting) == (4, 1)

    run.drain(eng)
    assert run.completed == ["small", "big", "long"]
    assert sorted(run.finals) == [("big", i) for i in range(6)] + [("long", 0), ("small", 0)]
    assert all(sum(r.slots.values()) <= 4 for r in run.reports)
    assert eng.has_room() and (eng.active, eng.waiting) == (0, 0)


# ---------------------------------------------------------------------------------------
# Snapshots.


def test_snapshots_every_k_steps(tiny: LoadedModel) -> None:
    eng = make_engine(tiny, max_batch=16)
    base = {"num_images": 2, "steps": 6, "seed": 4, "sampler": "ddpm"}
    eng.admit("x0", spec(**base, snapshot_every=2, snapshot_kind="x0"))
    eng.admit("xt", spec(**base, snapshot_every=2, snapshot_kind="xt"))
    eng.admit("none", spec(**base, snapshot_every=0))
    eng.admit("every3", spec(num_images=1, steps=7, seed=5, snapshot_every=3))
    eng.admit("every1", spec(num_images=1, steps=3, seed=6, snapshot_every=1))
    eng.admit("beyond", spec(num_images=1, steps=4, seed=7, snapshot_every=10))
    run = Run().drain(eng)

    def steps_of(job_id: str) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j, i, k in sorted(run.snapshots):
            if j == job_id:
                out.setdefault(i, []).append(k)
        return out

    assert steps_of("x0") == {0: [2, 4], 1: [2, 4]}       # step 6 is the final frame
    assert steps_of("xt") == {0: [2, 4], 1: [2, 4]}
    assert steps_of("none") == {}
    assert steps_of("every3") == {0: [3, 6]}
    assert steps_of("every1") == {0: [1, 2]}
    assert steps_of("beyond") == {}
    assert run.final_steps == {("x0", 0): 6, ("x0", 1): 6, ("xt", 0): 6, ("xt", 1): 6,
                               ("none", 0): 6, ("none", 1): 6, ("every3", 0): 7,
                               ("every1", 0): 3, ("beyond", 0): 4}
    # x_t (noisy) and x̂0 (denoised estimate) are different pictures of the same trajectory.
    for i in (0, 1):
        assert max_diff(run.snapshots["x0", i, 2], run.snapshots["xt", i, 2]) > 10
    # Snapshots are views only: the same seed ends at the same image whatever was emitted.
    assert_same(run.images("x0"), run.images("xt"))
    assert_same(run.images("x0"), run.images("none"))


def test_frames_follow_the_frame_plan_made_at_admission(tiny: LoadedModel) -> None:
    """The engine emits a snapshot exactly at its job's plan's steps (RePaint's jumps
    counted: the plan's steps are network steps), labels every frame with that plan, and
    the spec's frame count (what the API admits by) is what comes out."""
    eng = make_engine(tiny, max_batch=16)
    digest = "sha256:" + "0" * 64
    inputs = {"init_image": torch.zeros(3, SIZE, SIZE), "mask": torch.ones(1, SIZE, SIZE)}
    specs = {"plain": spec(num_images=2, steps=9, snapshot_every=4, snapshot_kind="xt"),
             "repaint": spec(num_images=1, steps=6, init_image=digest, mask=digest,
                             jump_length=2, jump_n_sample=2, snapshot_every=5),
             "small": spec(num_images=1, steps=5, snapshot_every=1, snapshot_size=8)}
    plans = {}
    for job_id, s in specs.items():
        job = eng.admit(job_id, s, inputs if s.inputs else None)
        plans[job_id] = job.plan
        assert job.plan == FramePlan.of(s, SIZE)
    assert plans["repaint"].steps_per_image > 6, "RePaint's jumps are steps of the plan"
    frames = [f for r in (eng.step() for _ in range(60) if eng.jobs) for f in r.frames]
    for job_id, s in specs.items():
        mine = [f for f in frames if f.job_id == job_id]
        assert all(f.plan is plans[job_id] for f in mine)
        for i in range(s.num_images):
            snaps = [f.step for f in mine if f.index == i and not f.final]
            assert snaps == list(plans[job_id].snapshot_steps), (job_id, i)
            assert [f.step for f in mine if f.index == i and f.final] == \
                [plans[job_id].steps_per_image]
        assert sum(not f.final for f in mine) == s.snapshot_frames
        side = plans[job_id].preview.size
        assert all(f.pixels.shape[0] == (SIZE if f.final else side) for f in mine)


@pytest.mark.parametrize("steps_per_image", [1, 2, 5, 12])
@pytest.mark.parametrize("every", [0, 1, 2, 5, 12])
def test_the_engines_due_rows_are_the_plans_snapshot_steps(steps_per_image: int,
                                                           every: int) -> None:
    plan = FramePlan(steps_per_image, every, "x0", None)  # type: ignore[arg-type]
    steps = torch.arange(1, steps_per_image + 1)
    due = snapshot_due(steps, torch.full_like(steps, every), steps == steps_per_image)
    assert [int(s) for s in steps[due]] == list(plan.snapshot_steps)


# ---------------------------------------------------------------------------------------
# Cancel.


def test_cancel_frees_slots_at_once(tiny: LoadedModel) -> None:
    keep_spec = spec(num_images=2, steps=10, seed=2, sampler="ddim")
    eng = make_engine(tiny)
    eng.admit("gone", spec(num_images=2, steps=10, seed=1, sampler="ddpm"))
    eng.admit("kept", keep_spec)
    run = Run()
    for _ in range(3):
        run.step(eng)
    assert eng.active == 4

    assert eng.cancel("gone") is True
    assert eng.active == 2
    assert "gone" not in eng.jobs
    assert eng.cancel("gone") is False          # already gone
    assert eng.cancel("never-admitted") is False

    before = len(run.reports)
    run.drain(eng)
    after = run.reports[before:]
    assert all("gone" not in r.progressed for r in after)
    assert all(f.job_id == "kept" for r in after for f in r.frames)
    assert all(r.slots == {"tiny": 2} for r in after)
    assert run.completed == ["kept"]
    assert not [k for k in run.finals if k[0] == "gone"]
    assert_same(run.images("kept"), alone(tiny, keep_spec))


def test_cancel_waiting_and_partly_running_jobs(tiny: LoadedModel) -> None:
    eng = make_engine(tiny, max_batch=3)
    eng.admit("part", spec(num_images=4, steps=5, seed=1))
    assert eng.cancel("part") is True                     # before any step: only waiting
    assert (eng.active, eng.waiting) == (0, 0) and not eng.jobs

    eng.admit("part", spec(num_images=4, steps=5, seed=1))    # the id is free again
    later_spec = spec(num_images=1, steps=4, seed=2)
    eng.admit("later", later_spec)
    run = Run()
    run.step(eng)
    assert (eng.active, eng.waiting) == (3, 2)
    assert eng.cancel("part") is True                     # 2 running, 2 waiting
    assert (eng.active, eng.waiting) == (1, 0)
    run.drain(eng)
    assert run.completed == ["later"]
    assert_same(run.images("later"), alone(tiny, later_spec))


# ---------------------------------------------------------------------------------------
# Admission errors.


def test_admit_rejects_what_cannot_run(tiny: LoadedModel, cond: LoadedModel) -> None:
    cfg = preset("tiny")
    short_cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion,
                                                                       num_timesteps=50))
    short = loaded("short", seed=1, cfg=short_cfg)
    eng = make_engine(tiny, cond, short)
    assert eng.models["short"].info.num_timesteps == 50

    with pytest.raises(ValueError, match="model"):
        eng.admit("a", spec(model="missing"))
    with pytest.raises(ValueError, match="steps"):
        eng.admit("b", spec(model="short", steps=60))
    with pytest.raises(ValueError, match="class_label"):
        eng.admit("c", spec(model="tiny", class_label=0))
    with pytest.raises(ValueError, match="class_label"):
        eng.admit("d", spec(model="cond", class_label=10))
    assert eng.jobs == {} and eng.waiting == 0

    first = eng.admit("e", spec(model="short", steps=50, num_images=2))
    with pytest.raises(ValueError, match="e"):
        eng.admit("e", spec(model="tiny", num_images=5))
    assert eng.jobs == {"e": first} and first.spec.model == "short"
    assert eng.waiting == 2

    with pytest.raises(ValueError, match="max_batch"):
        make_engine(tiny, max_batch=0)


# ---------------------------------------------------------------------------------------
# Class-conditional models and classifier-free guidance.


def test_guidance_changes_the_image_and_mixes_in_a_batch(cond: LoadedModel) -> None:
    guided = spec("cond", num_images=2, steps=6, seed=3, class_label=3, guidance_scale=3.0,
                  sampler="ddim")
    ref = alone(cond, guided)
    assert sorted(ref) == [0, 1]
    unguided = alone(cond, guided.model_copy(update={"guidance_scale": 1.0}))
    assert all(max_diff(ref[i], unguided[i]) > 10 for i in ref)
    other_label = alone(cond, guided.model_copy(update={"class_label": 7}))
    assert all(max_diff(ref[i], other_label[i]) > 0 for i in ref)

    # Guided rows beside unguided, other-label and unconditional rows of the same model.
    neighbours = {
        "plain": spec("cond", num_images=1, steps=5, seed=4, class_label=1),
        "uncond": spec("cond", num_images=2, steps=7, seed=5, sampler="ddpm"),
        "zero": spec("cond", num_images=1, steps=4, seed=6, class_label=9, guidance_scale=0.0),
    }
    eng = make_engine(cond, max_batch=16)
    run = Run()
    eng.admit("plain", neighbours["plain"])
    eng.admit("uncond", neighbours["uncond"])
    run.step(eng)
    eng.admit("g", guided)
    eng.admit("zero", neighbours["zero"])
    run.drain(eng)
    assert sorted(run.completed) == ["g", "plain", "uncond", "zero"]
    assert_same(run.images("g"), ref)
    for job_id, s in neighbours.items():
        assert_same(run.images(job_id), alone(cond, s))


# ---------------------------------------------------------------------------------------
# Several models in one engine.


def test_two_models_share_the_engine(tiny: LoadedModel) -> None:
    a, b = loaded("a", seed=0), loaded("b", seed=1)
    s = {"num_images": 2, "steps": 6, "seed": 5, "sampler": "ddim"}
    eng = make_engine(a, b, max_batch=8)
    eng.admit("ja", spec("a", **s))
    eng.admit("jb", spec("b", **s))
    run = Run()
    report = run.step(eng)
    assert report.slots == {"a": 2, "b": 2}
    assert set(report.forward_seconds) == {"a", "b"}
    assert sorted(report.progressed) == ["ja", "jb"]
    run.drain(eng)
    assert sorted(run.completed) == ["ja", "jb"]
    assert_same(run.images("ja"), alone(a, spec("a", **s)))
    assert_same(run.images("jb"), alone(b, spec("b", **s)))
    # Same request, other weights: other images.
    assert all(max_diff(run.images("ja")[i], run.images("jb")[i]) > 10 for i in (0, 1))


def test_max_batch_counts_slots_of_every_model() -> None:
    a, b = loaded("a", seed=0), loaded("b", seed=1)
    eng = make_engine(a, b, max_batch=3)
    eng.admit("ja", spec("a", num_images=2, steps=4, seed=1))
    eng.admit("jb", spec("b", num_images=2, steps=3, seed=2))
    run = Run()
    first = run.step(eng)
    assert sum(first.slots.values()) == 3 and eng.waiting == 1
    run.drain(eng)
    assert all(sum(r.slots.values()) <= 3 for r in run.reports)
    assert len(run.finals) == 4 and sorted(run.completed) == ["ja", "jb"]


# ---------------------------------------------------------------------------------------
# Out of memory.


class OomAbove:
    """The network, but out of memory on any forward of more than `limit` rows."""

    def __init__(self, net: Any, limit: int | None) -> None:
        self.net, self.limit = net, limit
        self.calls: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls.append(len(x))
        if self.limit is None or len(x) > self.limit:
            raise torch.OutOfMemoryError("test")
        return self.net(x, t, y)


@pytest.mark.parametrize(
    ("which", "s"),
    [
        ("tiny", spec(num_images=4, steps=5, seed=9, sampler="dpm++2m")),
        # Guided rows run twice: 2 images are a forward of 4 rows.
        ("cond", spec("cond", num_images=2, steps=5, seed=9, class_label=2,
                      guidance_scale=2.0)),
    ],
)
def test_out_of_memory_splits_the_forward(tiny: LoadedModel, cond: LoadedModel, which: str,
                                          s: GenerationSpec) -> None:
    model = {"tiny": tiny, "cond": cond}[which]
    ooms: list[tuple[str, int]] = []
    eng = make_engine(model, on_oom=lambda name, chunk: ooms.append((name, chunk)))
    fwd = eng._batches[which].forward
    wrapper = OomAbove(fwd.net, limit=2)
    fwd.net = wrapper
    eng.admit("j", s)
    run = Run()
    run.step(eng)
    assert ooms, "the forward never ran out of memory"
    assert all(name == which for name, _ in ooms)
    assert ooms[-1][1] <= 2
    assert [c for _, c in ooms] == sorted((c for _, c in ooms), reverse=True)
    seen = len(ooms)
    run.drain(eng)
    assert len(ooms) == seen                    # the smaller chunk is kept: no more retries
    assert run.completed == ["j"]
    assert max(wrapper.calls[-3:]) <= 2
    assert_same(run.images("j"), alone(model, s))


def test_out_of_memory_at_one_row_is_raised(tiny: LoadedModel) -> None:
    ooms: list[int] = []
    eng = make_engine(tiny, on_oom=lambda _, chunk: ooms.append(chunk))
    eng._batches["tiny"].forward.net = OomAbove(eng._batches["tiny"].forward.net, limit=None)
    eng.admit("j", spec(num_images=3, steps=3))
    with pytest.raises(torch.OutOfMemoryError):
        eng.step()
    assert ooms and ooms[-1] == 1


def test_image_steps_follow_each_image(tiny: LoadedModel) -> None:
    """3 images on 2 slots: images 0 and 1 run first, image 2 starts when one finishes."""
    e = make_engine(tiny, max_batch=2)
    job = e.admit("a", spec(num_images=3, steps=4))
    assert job.image_steps() == [0, 0, 0]
    e.step()
    assert job.image_steps() == [1, 1, 0]
    for _ in range(3):
        e.step()
    assert job.image_steps() == [4, 4, 0] and job.finished == 2
    e.step()
    assert job.image_steps() == [4, 4, 1]
    assert sum(job.image_steps()) == job.steps_done
