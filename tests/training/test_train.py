"""`ddpm train`: a short run learns, its output serves, resume is exact, DDP runs on gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import build_network, load_checkpoint, read_config
from training.trainer import (
    LOG_FILE,
    STATE_FILE,
    DataOrder,
    TrainError,
    TrainOptions,
    ema_decay_at,
    lr_at,
    train,
)

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def ddpm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 16×16 RGB images of two classes a network can tell apart: a bright left half or
    a bright top half, on noise."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, size=(128, 16, 16, 3), dtype=np.uint8)
    y = np.arange(128) % 2
    x[y == 0, :, :8] += 180
    x[y == 1, :8, :] += 180
    file = tmp_path_factory.mktemp("data") / "shapes.npz"
    np.savez(file, images=x, labels=y)
    return file


def opts(data: Path, out: Path, **kw: object) -> TrainOptions:
    base: dict[str, object] = dict(preset="tiny", batch_size=8, log_every=1, save_every=1000,
                                   sample_every=1000, sample_steps=2, device="cpu",
                                   progress=False)
    base.update(kw)
    return TrainOptions(data=data, out=out, **base)  # type: ignore[arg-type]


def test_a_short_run_learns_and_its_output_loads_and_samples(shapes: Path,
                                                              tmp_path: Path) -> None:
    out = train(opts(shapes, tmp_path / "run", steps=60, lr=2e-3, batch_size=16,
                     sample_every=30, conditional=True))
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 61))
    first, last = np.mean([e["loss"] for e in log[:5]]), np.mean([e["loss"] for e in log[-5:]])
    assert last < 0.6 * first, (first, last)
    assert log[-1]["lr"] == pytest.approx(2e-3)
    assert {"grad_norm", "images_per_s", "wall_seconds"} <= set(log[-1])

    ck = load_checkpoint(out)
    assert ck.conditional and ck.config.unet.num_classes == 2  # from the data's labels
    assert ck.config.class_names == ("0", "1")
    prov = ck.config.provenance
    assert prov["steps"] == 60 and prov["num_images"] == 128 and prov["weights"] == "EMA"
    assert prov["hardware"] and prov["wall_seconds"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step_0000030.png", "step_0000060.png"]

    # The served (EMA) weights differ from the raw ones, and both came from training.
    raw = torch.load(out / STATE_FILE, weights_only=True)["model"]
    ema = load_file(out / "model.safetensors")
    assert set(raw) == set(ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)

    res = ddpm("sample", str(out), "--num-images", "2", "--steps", "3", "--class-label", "1",
               "--guidance-scale", "2", "--device", "cpu", "--out", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == ["0000.png", "0001.png"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path / STATE_FILE, weights_only=True)
    return {**{f"raw.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in load_file(path / "model.safetensors").items()},
            **{f"adam.{i}.{k}": v for i, s in state["optimizer"]["state"].items()
               for k, v in s.items()}}


def test_resume_continues_exactly(shapes: Path, tmp_path: Path) -> None:
    """2N steps in one go and N steps + resume for N end with identical weights, optimizer
    and EMA; dropout, flips and label dropout all draw random numbers on the way."""
    kw = dict(dropout=0.3, hflip=True, conditional=True, label_dropout=0.3, warmup=3, seed=7)
    one = train(opts(shapes, tmp_path / "one", steps=8, **kw))
    train(opts(shapes, tmp_path / "two", steps=4, **kw))
    two = train(TrainOptions(data=None, out=tmp_path / "two", steps=8, resume=True,
                             log_every=1, progress=False, device="cpu", sample_steps=2))
    a, b = _weights(one), _weights(two)
    assert set(a) == set(b) and len(a) > 50
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    log_one = (one / LOG_FILE).read_text().splitlines()
    log_two = (two / LOG_FILE).read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log_one] == [json.loads(x)["loss"] for x in log_two]
    assert read_config(two).provenance["steps"] == 8

    # A different seed really is a different run (so the equality above can fail).
    other = train(opts(shapes, tmp_path / "other", steps=8, **{**kw, "seed": 8}))
    assert not torch.equal(_weights(other)["raw.conv_in.weight"], a["raw.conv_in.weight"])


def test_the_loop_applies_the_ema_warm_up(shapes: Path, tmp_path: Path) -> None:
    """The EMA after step k is d_k · EMA + (1 − d_k) · raw weights after the step, with the
    documented warm-up d_k = min(decay, (1 + k)/(10 + k)): 1/10 after the first step
    (from the initial weights, as built from the seed), 2/11 after the second. warmup=0 and
    a large lr make one Adam step move every weight by ~lr, far above the tolerance."""
    kw = dict(lr=1e-2, warmup=0, ema_decay=0.999, seed=3)
    out = train(opts(shapes, tmp_path / "run", steps=1, **kw))
    one = torch.load(out / STATE_FILE, weights_only=True)
    torch.manual_seed(3)
    initial = build_network(read_config(out).unet).state_dict()
    train(TrainOptions(data=None, out=out, steps=2, resume=True, log_every=1,
                       progress=False, device="cpu", sample_steps=2))
    two = torch.load(out / STATE_FILE, weights_only=True)
    served = load_file(out / "model.safetensors")

    def check(ema: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
              raw: dict[str, torch.Tensor], d: float) -> None:
        assert set(ema) == set(before) == set(raw)
        moved = max((raw[k].double() - before[k].double()).abs().max().item() for k in raw)
        assert moved > 1e-3, moved       # the mix is measurable
        for k in raw:
            want = d * before[k].double() + (1 - d) * raw[k].double()
            assert (ema[k].double() - want).abs().max().item() < 1e-6, (k, d)

    check(one["ema"], initial, one["model"], 1 / 10)
    check(two["ema"], one["ema"], two["model"], 2 / 11)
    assert all(torch.equal(served[k], two["ema"][k]) for k in served)


def test_resume_refuses_changed_settings_and_missing_state(shapes: Path, tmp_path: Path) -> None:
    out = train(opts(shapes, tmp_path / "run", steps=2))
    with pytest.raises(TrainError, match="already holds a training run"):
        train(opts(shapes, out, steps=4))
    with pytest.raises(TrainError, match="keeps the run's lr"):
        train(opts(shapes, out, steps=4, lr=0.5, resume=True))
    with pytest.raises(TrainError, match="does not exist"):
        train(opts(shapes, tmp_path / "nothing", steps=4, resume=True))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(TrainError, match="not readable"):
        train(opts(shapes, tmp_path / "bad", steps=4, resume=True))


def test_bad_options_give_clear_errors(shapes: Path, tmp_path: Path) -> None:
    x = np.zeros((4, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "unlabelled.npy", x)
    with pytest.raises(TrainError, match="has no labels"):
        train(opts(tmp_path / "unlabelled.npy", tmp_path / "a", steps=1, conditional=True))
    with pytest.raises(TrainError, match="--image-size 17"):
        train(opts(shapes, tmp_path / "b", steps=1, image_size=17))
    with pytest.raises(TrainError, match="--lr"):
        train(opts(shapes, tmp_path / "c", steps=1, lr=-1.0))
    res = ddpm("train", "--data", str(shapes), "--preset", "nope", "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "unknown preset 'nope'" in res.stderr
    res = ddpm("train", "--out", str(tmp_path / "e"))
    assert res.returncode == 2 and "--data and --preset are required" in res.stderr
    res = ddpm("train", "--data", str(tmp_path / "missing"), "--preset", "tiny",
               "--out", str(tmp_path / "f"))
    assert res.returncode == 2 and "no such file" in res.stderr


def test_an_unconditional_preset_ignores_labels_unless_asked(shapes: Path,
                                                            tmp_path: Path) -> None:
    out = train(opts(shapes, tmp_path / "u", steps=1))
    cfg = read_config(out)
    assert cfg.unet.num_classes == 0 and cfg.class_names == ()
    assert read_config(out).provenance["label_dropout"] is None


def test_ctrl_c_writes_a_checkpoint_that_resumes(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm", "train", "--data", str(shapes), "--preset", "tiny",
         "--out", str(out), "--steps", "100000", "--batch-size", "4", "--log-every", "1",
         "--device", "cpu", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = out / LOG_FILE
            if log.is_file() and len(log.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    state = torch.load(out / STATE_FILE, weights_only=True)
    logged = [json.loads(x)["step"] for x in (out / LOG_FILE).read_text().splitlines()]
    assert state["step"] >= 3 and logged[-1] == state["step"]
    assert read_config(out).provenance["steps"] == state["step"]
    resumed = train(TrainOptions(data=None, out=out, steps=state["step"] + 2, resume=True,
                                 log_every=1, progress=False, device="cpu", sample_steps=2))
    assert torch.load(resumed / STATE_FILE, weights_only=True)["step"] == state["step"] + 2


def test_two_gloo_processes_match_one(shapes: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: each takes half of the global batch (the same draws),
    DDP averages the gradients, so the result matches one process up to float rounding."""
    args = ["--data", str(shapes), "--preset", "tiny", "--steps", "4", "--batch-size", "8",
            "--log-every", "1", "--device", "cpu", "--no-progress", "--sample-every", "1000",
            "--sample-steps", "2", "--conditional"]
    single = ddpm("train", *args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "ddpm", "train", *args, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    prov = read_config(tmp_path / "ddp").provenance
    assert prov["hardware"].startswith("2 × ") and prov["steps"] == 4
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_schedules_and_data_order() -> None:
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 0.1, 0) == 0.1
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999
    order = DataOrder(10, 4, seed=3)
    steps = [order.indices(k) for k in range(5)]   # 20 positions: two whole epochs
    flat = torch.cat(steps)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])
    assert torch.equal(DataOrder(10, 4, seed=3).indices(3), steps[3])  # no state needed
