"""The native checkpoint format: round trips, atomic writes, and clear errors.

A checkpoint is a directory with `config.json` and `model.safetensors`. Every way it can be
broken must surface as `CheckpointError` naming the offending file, never as a torch or
safetensors exception, and loading must never unpickle anything.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from models import (
    CheckpointError,
    ModelConfig,
    UNet,
    load_checkpoint,
    preset,
    read_config,
    save_checkpoint,
)
from models.checkpoint import CONFIG_FILE, FORMAT, WEIGHTS_FILE


def _inputs(cfg: ModelConfig, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = cfg.unet
    x = torch.randn(n, u.in_channels, u.image_size, u.image_size, generator=g)
    t = torch.tensor([0, 37, 999][:n])
    return x, t


def _assert_clean_dir(path: Path) -> None:
    names = sorted(p.name for p in path.iterdir())
    assert CONFIG_FILE in names
    assert WEIGHTS_FILE in names
    leftovers = [n for n in names if n.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


@pytest.fixture
def ckpt(tmp_path: Path, net: UNet) -> Path:
    """A valid tiny checkpoint directory."""
    return save_checkpoint(tmp_path / "ck", net, preset("tiny"))


def _assert_error_names(exc: pytest.ExceptionInfo[CheckpointError], file: Path) -> str:
    assert type(exc.value) is CheckpointError
    msg = str(exc.value)
    assert str(file) in msg, f"{file} not named in: {msg}"
    return msg


# Round trips -----------------------------------------------------------------------------


def test_round_trip_unconditional(tmp_path: Path, net: UNet) -> None:
    cfg = preset("tiny")
    cfg = ModelConfig(unet=cfg.unet, diffusion=cfg.diffusion,
                      provenance={"source": "test", "steps": 12, "nested": {"a": [1, 2]}})
    path = save_checkpoint(tmp_path / "deep" / "ck", net, cfg)
    assert path == tmp_path / "deep" / "ck"
    _assert_clean_dir(path)

    ck = load_checkpoint(path)
    assert ck.config == cfg
    assert ck.config.provenance == {"source": "test", "steps": 12, "nested": {"a": [1, 2]}}
    assert ck.path == path
    assert not ck.conditional
    assert not ck.net.training
    x, t = _inputs(cfg)
    with torch.no_grad():
        want, got = net(x, t), ck.net(x, t)
    assert want.abs().max() > 0
    assert torch.equal(want, got)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck.net.state_dict()[k]), k


def test_saved_files_are_readable_by_other_users(tmp_path: Path, net: UNet) -> None:
    path = save_checkpoint(tmp_path / "ck", net, preset("tiny"))
    for name in ("config.json", "model.safetensors"):
        assert (path / name).stat().st_mode & 0o044 == 0o044, name


def test_round_trip_conditional(tmp_path: Path, make_net) -> None:  # type: ignore[no-untyped-def]
    base = preset("tiny").replace(num_classes=3)
    cfg = ModelConfig(unet=base.unet, diffusion=base.diffusion,
                      class_names=("cat", "dog", "bird"), provenance={"data": "toy"})
    net = make_net(5, num_classes=3)
    # Make the label embedding matter: default init is already random, but be explicit.
    assert net.label_emb is not None
    path = save_checkpoint(tmp_path / "cond", net, cfg)
    _assert_clean_dir(path)

    ck = load_checkpoint(path)
    assert ck.conditional
    assert ck.config == cfg
    assert ck.config.class_names == ("cat", "dog", "bird")
    assert ck.config.provenance == {"data": "toy"}
    assert ck.net.null_label == 3
    x, t = _inputs(cfg)
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():
        want, got = net(x, t, y), ck.net(x, t, y)
        other = ck.net(x, t, torch.tensor([1, 1, 1]))
    assert torch.equal(want, got)
    assert not torch.equal(got, other), "labels must change the output"


def test_config_json_content(ckpt: Path) -> None:
    doc = json.loads((ckpt / CONFIG_FILE).read_text())
    assert doc["format"] == "ddpm-serve/1" == FORMAT
    assert doc["unet"]["ch"] == preset("tiny").unet.ch
    assert doc["unet"]["ch_mult"] == list(preset("tiny").unet.ch_mult)
    assert doc["diffusion"]["variance_type"] == preset("tiny").diffusion.variance_type


def test_save_overwrites_existing_checkpoint(tmp_path: Path, make_net) -> None:  # type: ignore[no-untyped-def]
    a, b = make_net(1), make_net(2)
    path = save_checkpoint(tmp_path / "ck", a, preset("tiny"))
    save_checkpoint(path, b, preset("tiny"))
    _assert_clean_dir(path)
    x, t = _inputs(preset("tiny"))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).net(x, t), b(x, t))


def test_read_config_without_weights(ckpt: Path) -> None:
    (ckpt / WEIGHTS_FILE).unlink()
    assert read_config(ckpt) == preset("tiny")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    _assert_error_names(exc, ckpt / WEIGHTS_FILE)


# Errors ----------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(missing)
    _assert_error_names(exc, missing)


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(f)
    _assert_error_names(exc, f)


def test_missing_config(ckpt: Path) -> None:
    (ckpt / CONFIG_FILE).unlink()
    for call in (load_checkpoint, read_config):
        with pytest.raises(CheckpointError) as exc:
            call(ckpt)
        _assert_error_names(exc, ckpt / CONFIG_FILE)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_invalid_json(ckpt: Path, text: str) -> None:
    (ckpt / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    _assert_error_names(exc, ckpt / CONFIG_FILE)


@pytest.mark.parametrize("fmt", ["ddpm-serve/2", None, "MISSING"])
def test_wrong_format(ckpt: Path, fmt: str | None) -> None:
    file = ckpt / CONFIG_FILE
    doc = json.loads(file.read_text())
    if fmt == "MISSING":
        del doc["format"]
    else:
        doc["format"] = fmt
    file.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    msg = _assert_error_names(exc, file)
    assert "format" in msg
    assert FORMAT in msg


def test_json_not_an_object(ckpt: Path) -> None:
    file = ckpt / CONFIG_FILE
    file.write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError) as exc:
        read_config(ckpt)
    _assert_error_names(exc, file)


def _edit_unet(ckpt: Path, **changes: object) -> Path:
    """Change fields of config.json's unet section; returns the config file."""
    file = ckpt / CONFIG_FILE
    doc = json.loads(file.read_text())
    doc["unet"].update(changes)
    file.write_text(json.dumps(doc))
    return file


def test_unknown_unet_field(ckpt: Path) -> None:
    file = _edit_unet(ckpt, num_heads=4)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    msg = _assert_error_names(exc, file)
    assert "num_heads" in msg


def test_invalid_unet_value(ckpt: Path) -> None:
    file = _edit_unet(ckpt, image_size=15)  # not divisible by 2 for two levels
    with pytest.raises(CheckpointError) as exc:
        read_config(ckpt)
    _assert_error_names(exc, file)


def test_garbage_weights(ckpt: Path) -> None:
    file = ckpt / WEIGHTS_FILE
    file.write_bytes(b"this is not a safetensors file at all" * 20)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    _assert_error_names(exc, file)


def test_tiny_garbage_weights(ckpt: Path) -> None:
    file = ckpt / WEIGHTS_FILE
    file.write_bytes(b"abc")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    _assert_error_names(exc, file)


def test_truncated_weights(ckpt: Path) -> None:
    file = ckpt / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    _assert_error_names(exc, file)


def test_weights_do_not_match_config(ckpt: Path) -> None:
    _edit_unet(ckpt, ch=64)
    assert read_config(ckpt).unet.ch == 64  # the config itself is valid
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    msg = _assert_error_names(exc, ckpt / WEIGHTS_FILE)
    assert "do not match" in msg
    assert "wrong shape" in msg


def test_weights_missing_tensors(ckpt: Path) -> None:
    """A conditional config over unconditional weights: label_emb is missing."""
    _edit_unet(ckpt, num_classes=3)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    msg = _assert_error_names(exc, ckpt / WEIGHTS_FILE)
    assert "do not match" in msg
    assert "label_emb.weight" in msg


# Never unpickle --------------------------------------------------------------------------


class _Evil:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_loader_never_unpickles(ckpt: Path, tmp_path: Path, net: UNet) -> None:
    marker = tmp_path / "PWNED"
    # Sanity: the payload really fires when unpickled.
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()
    marker.unlink()

    payload = pickle.dumps(_Evil(marker))
    for name in ("model.bin", "model.pt", "pytorch_model.bin", "model.ckpt", "model.pkl"):
        (ckpt / name).write_bytes(payload)
    torch.save({"w": _Evil(marker)}, ckpt / "diffusion_pytorch_model.bin")
    assert not marker.exists()

    ck = load_checkpoint(ckpt)
    read_config(ckpt)
    x, t = _inputs(preset("tiny"))
    with torch.no_grad():
        assert torch.equal(ck.net(x, t), net(x, t))
    assert not marker.exists()


def test_pickle_disguised_as_safetensors(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    file = ckpt / WEIGHTS_FILE
    torch.save({"w": _Evil(marker)}, file)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt)
    _assert_error_names(exc, file)
    assert not marker.exists()


def test_no_temp_files_after_failed_write(tmp_path: Path, net: UNet) -> None:
    """A write that fails midway leaves no temp file and no config.json."""
    path = tmp_path / "ck"

    tiny = preset("tiny")
    bad = ModelConfig(unet=tiny.unet, diffusion=tiny.diffusion,
                      provenance={"x": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        save_checkpoint(path, net, bad)
    leftovers = [n for n in os.listdir(path) if n.startswith(".")]
    assert leftovers == []
    assert not (path / CONFIG_FILE).exists()


@pytest.mark.parametrize(("ch", "layout"), [(8, torch.contiguous_format),
                                            (16, torch.contiguous_format),
                                            (32, torch.channels_last)])
def test_a_checkpoint_loaded_for_inference_takes_the_layout_its_width_runs_fastest_in(
        tmp_path: Path, ch: int, layout: torch.memory_format) -> None:
    """`for_inference` on the CPU: channels-last from 32 channels (tiny, mnist, cifar10),
    NCHW below (8 channels: 1.3-1.7x slower channels-last, BENCHMARKS.md §16), the same ε
    up to rounding; on CUDA the weights keep their layout (the worker's Forward decides)."""
    from dataclasses import replace

    from models import inference_memory_format, init_checkpoint

    base = preset("tiny")
    cfg = replace(base, unet=replace(base.unet, ch=ch))
    path = init_checkpoint(tmp_path / "m", cfg)
    ck = load_checkpoint(path, for_inference=True)
    other = torch.contiguous_format if layout == torch.channels_last else torch.channels_last
    convs = [p for p in ck.net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[3] > 1]
    assert convs and all(p.is_contiguous(memory_format=layout)
                         and not p.is_contiguous(memory_format=other) for p in convs)
    assert inference_memory_format("cuda", cfg.unet) == torch.contiguous_format
    plain = load_checkpoint(path)
    x, t = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ck.net(x, t), plain.net(x, t), rtol=1e-4, atol=1e-5)
