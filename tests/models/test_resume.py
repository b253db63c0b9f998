"""A slot's exported state continues in another batch as the same computation, bit for bit.

For every sampler, guidance, img2img, inpainting with resampling and interpolation, a slot
is cut after every possible number of steps k (0 … its last), its state goes into a new
`SlotBatch` that already holds other slots at other positions (and gains more), and every
later step's x_t and x̂0, the final image included, must equal the uninterrupted run's
(`torch.equal`).

The network is a small real UNet (`micro_net`: 11k parameters, so that every cut of every
case runs in seconds) applied one row at a time (`RowWise`): a CPU convolution's result
depends on the batch size in the last bits (1e-6; test_batch.py holds images to 1e-4 across
batch compositions), which is the network's property, not the state's. One test keeps the
batched `tiny` network and the same batch composition, where bits must match too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from models import DiffusionConfig, SamplerKind, Schedule, SlotBatch, SlotSpec, repaint_plan
from models.resume import SlotState
from tests.conftest import tiny_net

SCHED = Schedule.from_config(DiffusionConfig())
SHAPE = (3, 16, 16)
NUM_CLASSES = 3


class RowWise(torch.nn.Module):
    """The network, one row per forward: outputs independent of what shares the batch."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return torch.cat([self.net(x[i:i + 1], t[i:i + 1], None if y is None else y[i:i + 1])
                          for i in range(len(x))])


def image(seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 4, 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")[0]


MASK = torch.zeros(1, 16, 16)
MASK[:, 8:, :] = 1.0
A, B = image(1), image(2)

CASES: dict[str, SlotSpec] = {
    "ddpm-small": SlotSpec(seed=1, index=2, steps=7, kind=SamplerKind.DDPM_SMALL),
    "ddpm-large": SlotSpec(seed=2, steps=7, kind=SamplerKind.DDPM_LARGE),
    "ddim": SlotSpec(seed=3, steps=7, kind=SamplerKind.DDIM),
    "ddim-eta": SlotSpec(seed=4, steps=7, kind=SamplerKind.DDIM, eta=0.6),
    "dpm++2m": SlotSpec(seed=5, steps=7, kind=SamplerKind.DPMPP_2M),
    "guided": SlotSpec(seed=6, steps=6, kind=SamplerKind.DPMPP_2M, label=2, guidance=3.0),
    "img2img": SlotSpec(seed=7, steps=5, kind=SamplerKind.DDPM_SMALL, init=A, strength=0.6),
    "inpaint-resampled-dpm": SlotSpec(seed=8, steps=6, kind=SamplerKind.DPMPP_2M, init=A,
                                      mask=MASK, jump_length=2, jump_n_sample=3),
    "inpaint-resampled-ddim": SlotSpec(seed=9, steps=5, kind=SamplerKind.DDIM, eta=0.3,
                                       init=B, mask=MASK, jump_length=1, jump_n_sample=2),
    "interpolation": SlotSpec(seed=10, steps=5, kind=SamplerKind.DDIM, init=A, init_b=B,
                              mix=0.4, strength=0.5),
}
# Other slots of the new batch: two already there (stepped before the state arrives), one
# added with it; they finish at other times, so the resumed row moves within the batch.
BEFORE = [SlotSpec(seed=50, steps=9, kind=SamplerKind.DDIM),
          SlotSpec(seed=51, index=3, steps=4, kind=SamplerKind.DPMPP_2M, init=B, mask=MASK)]
WITH = SlotSpec(seed=52, steps=3, kind=SamplerKind.DDPM_LARGE)


@dataclass
class Reference:
    """The uninterrupted run of one slot: each step's (x_t, x̂0), and its state before
    each step k (after k steps)."""

    outputs: list[tuple[Tensor, Tensor]]
    states: list[SlotState]


def micro_net(seed: int = 0, **changes: object) -> RowWise:
    """A one-level UNet with 8 channels (GroupNorm, time and class embeddings), row-wise."""
    return RowWise(tiny_net(seed, ch=8, ch_mult=(1,), attn_resolutions=(), norm_groups=4,
                            **changes))


def case_net(name: str) -> tuple[RowWise, dict[str, int]]:
    if name == "guided":
        return micro_net(seed=3, num_classes=NUM_CLASSES), {"num_classes": NUM_CLASSES}
    return micro_net(), {}


def uninterrupted(net: torch.nn.Module, spec: SlotSpec, **kw: int) -> Reference:
    batch = SlotBatch(net, SCHED, shape=SHAPE, **kw)
    batch.add([spec])
    outputs, states = [], []
    while True:
        states.append(batch.export([0])[0])
        out = batch.step()
        outputs.append((out.x_t[0].clone(), out.x0[0].clone()))
        if bool(out.finished[0]):
            return Reference(outputs, states)


def resumed(net: torch.nn.Module, spec: SlotSpec, state: SlotState,
            **kw: int) -> list[tuple[Tensor, Tensor]]:
    """The slot's remaining steps from `state` in a new batch among other slots."""
    batch = SlotBatch(net, SCHED, shape=SHAPE, **kw)
    batch.add(BEFORE)
    batch.step()
    batch.step()
    batch.add([spec, WITH], [state, None])
    owner = ["b0", "b1", "target", "with"]
    outputs: list[tuple[Tensor, Tensor]] = []
    while "target" in owner:
        out = batch.step()
        row = owner.index("target")
        outputs.append((out.x_t[row].clone(), out.x0[row].clone()))
        owner = [o for o, f in zip(owner, out.finished.tolist(), strict=True) if not f]
        batch.keep(~out.finished)
    return outputs


def assert_equal_outputs(got: list[tuple[Tensor, Tensor]], want: list[tuple[Tensor, Tensor]],
                         what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} steps, not {len(want)}"
    for j, ((x, x0), (wx, wx0)) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(x, wx), f"{what}: x_t differs after {j + 1} more steps " \
                                   f"(by {float((x - wx).abs().max()):.3g})"
        assert torch.equal(x0, wx0), f"{what}: x̂0 differs after {j + 1} more steps"


@pytest.mark.parametrize("name", list(CASES))
def test_a_slot_resumed_at_every_step_finishes_bit_for_bit(name: str) -> None:
    spec = CASES[name]
    net, kw = case_net(name)
    ref = uninterrupted(net, spec, **kw)
    length = len(ref.outputs)
    if spec.resampling:
        assert length == len(repaint_plan(spec.steps, 1000, spec.jump_length,
                                          spec.jump_n_sample)) > spec.steps  # undo steps
    for k in range(length):
        state = ref.states[k]
        assert state.pos == k and state.x.dtype == torch.float32
        assert_equal_outputs(resumed(net, spec, state, **kw), ref.outputs[k:],
                             f"{name} resumed after {k} steps")
    # The comparison can fail: a slot continued from another slot's state differs.
    other = uninterrupted(net, SlotSpec(seed=99, steps=spec.steps, kind=spec.kind), **kw)
    got = resumed(net, spec, SlotState(pos=1, x=other.states[1].x,
                                       x0_prev=other.states[1].x0_prev), **kw)
    assert not torch.equal(got[-1][0], ref.outputs[-1][0])


def test_x0_prev_travels_only_where_the_next_step_reads_it() -> None:
    """DPM-Solver++(2M) reads x̂0_prev on its second-order steps (not its first nor its
    last); DDPM and DDIM never; inpainting's undo steps repeat it as their x̂0."""
    net = micro_net()
    dpm = uninterrupted(net, CASES["dpm++2m"]).states
    assert [s.x0_prev is not None for s in dpm] == [False] + [True] * 5 + [False]
    for name in ("ddpm-small", "ddpm-large", "ddim", "ddim-eta", "img2img"):
        assert all(s.x0_prev is None for s in uninterrupted(net, CASES[name]).states), name
    spec = CASES["inpaint-resampled-ddim"]
    plan = [*repaint_plan(spec.steps, 1000, spec.jump_length, spec.jump_n_sample).tolist(), -1]
    states = uninterrupted(net, spec).states
    undo_next = [k > 0 and plan[k + 1] > plan[k] for k in range(len(states))]
    assert any(undo_next)
    assert [s.x0_prev is not None for s in states] == undo_next


def test_same_composition_with_the_batched_network_is_bit_for_bit() -> None:
    """Every slot of a batch exported after k steps and added, in order, to a new batch:
    the remaining steps are the same computation, batched network and all."""
    net = tiny_net()
    specs = [CASES[n] for n in ("ddpm-small", "ddim-eta", "dpm++2m", "inpaint-resampled-dpm")]
    ref = SlotBatch(net, SCHED, shape=SHAPE)
    ref.add(specs)
    for _ in range(3):
        ref.step()
    states = ref.export(range(len(specs)))
    again = SlotBatch(net, SCHED, shape=SHAPE)
    again.add(specs, states)
    while True:
        a, b = ref.step(), again.step()
        assert torch.equal(a.x_t, b.x_t) and torch.equal(a.x0, b.x0)
        assert torch.equal(a.steps_done, b.steps_done)
        if bool(a.finished.any()):
            break


def test_states_that_cannot_continue_are_refused_and_leave_the_batch_unchanged() -> None:
    net = micro_net()
    spec = CASES["dpm++2m"]
    states = uninterrupted(net, spec).states
    batch = SlotBatch(net, SCHED, shape=SHAPE)
    batch.add([WITH])
    bad = {
        "past the end": SlotState(pos=7, x=states[0].x),
        "negative": SlotState(pos=-1, x=states[0].x),
        "shape": SlotState(pos=2, x=torch.zeros(3, 8, 8), x0_prev=states[2].x0_prev),
        "x0_prev shape": SlotState(pos=2, x=states[2].x, x0_prev=torch.zeros(1, 16, 16)),
        "no x0_prev": SlotState(pos=2, x=states[2].x),
    }
    for what, st in bad.items():
        with pytest.raises(ValueError):
            batch.add([spec, spec], [None, st])
        assert len(batch) == 1 and batch.x.shape[0] == 1, what
    with pytest.raises(ValueError, match="states for"):
        batch.add([spec], [])
    out = batch.step()
    batch.keep(~out.finished)
    with pytest.raises(ValueError, match="finished"):
        stepped = SlotBatch(net, SCHED, shape=SHAPE)
        stepped.add([SlotSpec(seed=1, steps=1)])
        stepped.step()
        stepped.export([0])
