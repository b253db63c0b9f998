"""The logic of the engine's CUDA out-of-memory path, run on the CPU in the normal suite:
a network that raises torch's own `torch.OutOfMemoryError` (what the CUDA allocator raises)
for forwards over `limit` rows stands in for a GPU that is too small. Public API only: the
network is the checkpoint's, as a worker would load it. test_cuda_paths.py does the same
with a real CUDA out-of-memory error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from contract.spec import GenerationSpec
from models import Checkpoint, Schedule, UNet, preset
from worker.engine import Engine, LoadedModel


class OomAbove(nn.Module):
    """The UNet, out of memory on any forward of more than `limit` rows (None: always)."""

    def __init__(self, net: UNet, limit: int | None) -> None:
        super().__init__()
        self.net, self.limit = net, limit
        self.rows: list[int] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.rows.append(len(x))
        if self.limit is None or len(x) > self.limit:
            raise torch.OutOfMemoryError(f"test: {len(x)} rows > {self.limit}")
        return self.net(x, t, y)


def model(limit: int | None) -> tuple[LoadedModel, OomAbove]:
    torch.manual_seed(0)
    cfg = preset("tiny")
    net = OomAbove(UNet(cfg.unet).eval(), limit)
    ck = Checkpoint(net=net, config=cfg, schedule=Schedule.from_config(cfg.diffusion),  # type: ignore[arg-type]
                    path=Path("."))
    return LoadedModel.from_checkpoint("tiny", ck, 0.0), net


def finals(engine: Engine, spec: GenerationSpec) -> Tensor:
    """The job's final images in index order, stepping until they are all out."""
    engine.admit("j", spec)
    out: dict[int, Tensor] = {}
    for _ in range(100):
        out |= {f.index: f.pixels for f in engine.step().frames if f.final}
        if len(out) == spec.num_images:
            return torch.stack([out[i] for i in sorted(out)])
    raise AssertionError("the job did not finish")


SPEC = GenerationSpec(model="tiny", num_images=8, steps=4, seed=3, sampler="dpm++2m")


@pytest.mark.parametrize(("limit", "expected"), [(5, [4]), (3, [4, 2]), (1, [4, 2, 1])])
def test_oom_halves_the_chunk_until_it_fits_and_keeps_the_images(
        limit: int, expected: list[int]) -> None:
    """8 rows; each OOM halves the chunk (reported through on_oom) until chunks fit; the
    smaller chunk is kept for the later steps; the images are those of an engine that
    never ran out of memory. Fails if the retry drops or duplicates rows, re-runs a step
    that had already advanced the state, or forgets the chunk between steps."""
    ref_model, _ = model(limit=None)
    ref_model.checkpoint.net.limit = 10**9           # type: ignore[attr-defined]
    ref = finals(Engine({"tiny": ref_model}, device="cpu", max_batch=8), SPEC)

    m, net = model(limit)
    seen: list[tuple[str, int]] = []
    got = finals(Engine({"tiny": m}, device="cpu", max_batch=8,
                        on_oom=lambda name, chunk: seen.append((name, chunk))), SPEC)
    assert seen == [("tiny", c) for c in expected]
    assert max(net.rows[-3:]) <= expected[-1]        # later steps run in the kept chunk
    assert torch.equal(got, ref)                     # bit-identical on the CPU


def test_oom_at_one_row_raises_after_halving_to_one() -> None:
    m, _ = model(limit=None)
    seen: list[int] = []
    eng = Engine({"tiny": m}, device="cpu", max_batch=8,
                 on_oom=lambda name, chunk: seen.append(chunk))
    eng.admit("j", SPEC)
    with pytest.raises(torch.OutOfMemoryError):
        eng.step()
    assert seen == [4, 2, 1]
