"""Snapshot previews in the engine: downscaled on the device as the spec asks, finals
untouched at full size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_engine import SIZE, loaded

from contract.preview import Preview
from contract.spec import GenerationSpec
from models import to_uint8
from worker.engine import Engine, frame_pixels


def test_frame_pixels_are_block_means_at_each_rows_size() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = frame_pixels(x, [8, 16, 4])
    assert [tuple(p.shape) for p in out] == [(8, 8, 3), (16, 16, 3), (4, 4, 3)]
    assert torch.equal(out[1], to_uint8(x[1:2])[0])
    blocks = x[0].reshape(3, 8, 2, 8, 2).mean(dim=(2, 4))          # 2x2 block means
    assert torch.equal(out[0], to_uint8(blocks[None])[0])
    assert torch.equal(out[2], to_uint8(F.avg_pool2d(x[2:3], 4))[0])


def run(engine: Engine, spec: GenerationSpec) -> tuple[dict[int, torch.Tensor], list]:
    engine.admit("j", spec)
    finals, snaps = {}, []
    while engine.jobs:
        for f in engine.step().frames:
            if f.final:
                finals[f.index] = f.pixels
            else:
                snaps.append(f)
    return finals, snaps


def test_previews_are_small_and_finals_are_the_same_as_without_snapshots() -> None:
    model = loaded()
    base = {"model": "tiny", "num_images": 3, "steps": 6, "seed": 5, "sampler": "ddim"}
    plain, none = run(Engine({"tiny": model}, device="cpu", max_batch=8),
                      GenerationSpec(**base))
    assert none == []
    spec = GenerationSpec(**base, snapshot_every=2, snapshot_size=8, snapshot_kind="xt")
    assert spec.preview(SIZE) == Preview(8, "png")
    finals, snaps = run(Engine({"tiny": model}, device="cpu", max_batch=8), spec)
    assert len(snaps) == spec.snapshot_frames == 3 * 2
    assert all(tuple(f.pixels.shape) == (8, 8, 3) for f in snaps)
    assert all(torch.equal(finals[i], plain[i]) for i in range(3))
    assert all(tuple(p.shape) == (SIZE, SIZE, 3) for p in finals.values())


def test_default_preview_depends_on_the_image_size() -> None:
    s = GenerationSpec(model="m", snapshot_every=1)
    assert s.preview(28) == Preview(28, "png")
    assert s.preview(256) == Preview(128, "jpeg", 75)
    assert s.preview(96) == Preview(96, "jpeg", 75)
    w = GenerationSpec(model="m", snapshot_every=1, snapshot_format="webp", snapshot_size=64)
    assert w.preview(256) == Preview(64, "webp", 75) and w.preview(32) == Preview(32, "webp", 75)
