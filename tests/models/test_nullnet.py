"""The `null` preset: a real, servable checkpoint whose forward costs ~nothing.

Benchmarks use it to show the ceiling the serving stack sets. It must round-trip as a
checkpoint, run through every sampler and be served by the worker like any model, while
its forward stays one multiply: checked by counting parameters, FLOPs and torch calls,
never by timing.
"""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from contract.keys import image_key
from contract.queueing import enqueue, fetch_job
from contract.spec import GenerationSpec
from models import (
    PRESETS,
    CheckpointError,
    NullNet,
    SamplerKind,
    Schedule,
    SlotSpec,
    UNet,
    build_network,
    count_parameters,
    init_checkpoint,
    load_checkpoint,
    preset,
    read_config,
    sample,
)
from models.checkpoint import CONFIG_FILE
from worker.catalog import load_models
from worker.main import build_worker
from worker.settings import WorkerSettings


class CountCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    u = preset("null").unet
    x = torch.randn(n, u.in_channels, u.image_size, u.image_size,
                    generator=torch.Generator().manual_seed(0))
    return x, torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(1))


def test_null_is_a_preset_and_builds_a_null_net() -> None:
    assert "null" in PRESETS
    assert isinstance(build_network(preset("null").unet), NullNet)
    assert isinstance(build_network(preset("tiny").unet), UNet)


def test_null_checkpoint_round_trips(tmp_path: Path) -> None:
    path = init_checkpoint(tmp_path / "null", preset("null"))
    assert json.loads((path / CONFIG_FILE).read_text())["unet"]["arch"] == "null"
    assert read_config(path) == preset("null")
    ck = load_checkpoint(path)
    assert isinstance(ck.net, NullNet)
    x, t = _inputs(4)
    with torch.no_grad():
        assert torch.equal(ck.net(x, t), x)          # w = 1 as initialised, read back


def test_real_models_configs_do_not_name_an_arch_and_a_bad_one_is_refused(
        tmp_path: Path) -> None:
    """config.json of every real model stays as it was before `arch` existed; an unknown
    arch is a clear error, not a UNet built by default."""
    path = init_checkpoint(tmp_path / "tiny", preset("tiny"))
    doc = json.loads((path / CONFIG_FILE).read_text())
    assert "arch" not in doc["unet"]
    doc["unet"]["arch"] = "transformer"
    (path / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="arch"):
        load_checkpoint(path)


def test_the_forward_is_one_multiply_of_one_parameter() -> None:
    """Not timed: the null net has 1 parameter, does no FLOPs a counter sees (convolutions,
    matmuls) and calls torch once per forward, at any batch; the tiny UNet, as a control
    that the counters see work, does millions and hundreds."""
    null, tiny = build_network(preset("null").unet), build_network(preset("tiny").unet)
    assert count_parameters(null) == 1
    x, t = _inputs(64)
    for net, shape in ((null, x.shape), (tiny, (64, 3, 16, 16))):
        xs = x if net is null else torch.randn(shape)
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            net(xs, t)
        with torch.no_grad(), CountCalls() as calls:
            net(xs, t)
        if net is null:
            assert flops.get_total_flops() == 0
            assert calls.calls == 1
        else:
            assert flops.get_total_flops() > 10**6
            assert calls.calls > 100


@pytest.mark.parametrize("kind", list(SamplerKind))
def test_every_sampler_runs_it_to_finite_images(kind: SamplerKind) -> None:
    cfg = preset("null").replace(num_classes=3)       # also the guided (doubled) forward
    net = build_network(cfg.unet).eval()
    u = cfg.unet
    specs = [SlotSpec(seed=i, steps=20, kind=kind, eta=1.0 if kind == SamplerKind.DDIM else 0.0,
                      label=i % 3, guidance=3.0 if i % 2 else 1.0) for i in range(6)]
    x = sample(net, Schedule.from_config(cfg.diffusion), specs,
               shape=(u.in_channels, u.image_size, u.image_size), num_classes=u.num_classes)
    assert x.shape == (6, 1, 8, 8)
    assert torch.isfinite(x).all()
    assert x.abs().max() <= 1.0


def test_the_catalog_loads_it_like_any_model(tmp_path: Path) -> None:
    init_checkpoint(tmp_path / "null", preset("null"))
    init_checkpoint(tmp_path / "tiny", preset("tiny"))
    catalog = load_models(tmp_path, torch.device("cpu"))
    assert catalog.broken == {}
    assert sorted(catalog.loaded) == ["null", "tiny"]
    info = catalog.loaded["null"].info
    assert (info.parameters, info.image_size, info.in_channels) == (1, 8, 1)


def test_a_worker_serves_it(tmp_path: Path, r: redis.Redis, redis_url: str) -> None:
    """The real worker loop (RQ, Redis, PNGs) finishes null jobs: no special case needed."""
    init_checkpoint(tmp_path / "null", preset("null"))
    jobs = [enqueue(r, GenerationSpec(model="null", num_images=n, steps=5, seed=n,
                                      sampler=s, snapshot_every=2))
            for n, s in ((1, "ddim"), (3, "dpm++2m"), (2, "ddpm"))]
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        build_worker(WorkerSettings(redis_url=redis_url, models_dir=tmp_path, device="cpu",
                                    max_batch=4)).work(burst=True)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    for job, n in zip(jobs, (1, 3, 2), strict=True):
        assert fetch_job(r, job.id).get_status() == "finished"
        for i in range(n):
            png = r.get(image_key(job.id, i))
            assert png is not None, f"image {i} of {job.id} missing"
            assert np.asarray(Image.open(io.BytesIO(png))).shape == (8, 8)
