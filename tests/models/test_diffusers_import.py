"""Importing diffusers DDPM checkpoints (UNet2DModel + DDPMScheduler) as native ones.

The parity test builds a randomly initialised UNet2DModel with the configuration of
google/ddpm-cifar10-32, saves it in the published layout, converts it with `ddpm convert`
and requires the same ε as diffusers. The other tests use a small model to cover the
other layouts, old tensor names, `.bin` files (and malicious ones), and refusals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, ConfigError, load_checkpoint
from models.diffusers_import import (
    convert_diffusers,
    diffusion_config_from_diffusers,
    unet_config_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model.safetensors"
BIN = "diffusion_pytorch_model.bin"

CIFAR_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2, "attention_head_dim": None, "norm_eps": 1e-6,
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "dropout": 0.1,
}
CIFAR_SCHED: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
    "beta_end": 0.02, "variance_type": "fixed_large", "clip_sample": True,
}
SMALL_UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8, "attention_head_dim": None, "norm_eps": 1e-6,
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "layers_per_block": 1,
}
SMALL_SCHED: dict[str, Any] = {**CIFAR_SCHED, "variance_type": "fixed_small"}
TIMESTEPS = [0, 10, 500, 999]


def make_unet(cfg: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**cfg).eval()


def make_scheduler(cfg: dict[str, Any]) -> Any:
    return diffusers.DDPMScheduler(**cfg)


def ddpm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ddpm", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def convert_cli(src: Path, dst: Path) -> None:
    r = ddpm("convert", src, dst)
    assert r.returncode == 0, r.stderr
    assert str(dst) in r.stdout


def max_eps_diff(model: Any, dst: Path, seed: int = 0) -> float:
    """Max |ε_diffusers − ε_ours| on 4 random inputs at TIMESTEPS."""
    ck = load_checkpoint(dst)
    size, channels = model.config.sample_size, model.config.in_channels
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(TIMESTEPS), channels, size, size, generator=g)
    t = torch.tensor(TIMESTEPS)
    with torch.no_grad():
        theirs = model(x, t).sample
        ours = ck.net(x, t)
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 1e-2, "degenerate model: ε is ~0"
    # The timestep must matter, or a wrong time embedding would go unnoticed.
    assert (theirs[0] - model(x[:1], torch.tensor([999])).sample[0]).abs().max() > 1e-3
    return float((ours - theirs).abs().max())


def save_unet_folder(folder: Path, model: Any, safe: bool = True) -> Path:
    model.save_pretrained(folder, safe_serialization=safe)
    assert (folder / "config.json").is_file()
    assert (folder / (WEIGHTS if safe else BIN)).is_file()
    return folder


# The parity test: google/ddpm-cifar10-32 -------------------------------------------------


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """(diffusers model, source folder, converted checkpoint), built once."""
    model = make_unet(CIFAR_UNET)
    src = tmp_path_factory.mktemp("cifar") / "ddpm-cifar10-32"
    save_unet_folder(src, model)
    make_scheduler(CIFAR_SCHED).save_pretrained(src)  # beside the UNet, as the hub repo has it
    assert (src / "scheduler_config.json").is_file()
    dst = tmp_path_factory.mktemp("converted") / "cifar10"
    convert_cli(src, dst)
    return model, src, dst


def test_cifar10_eps_matches_diffusers(cifar: tuple[Any, Path, Path]) -> None:
    model, _, dst = cifar
    assert max_eps_diff(model, dst) < 1e-4


def test_cifar10_converted_config(cifar: tuple[Any, Path, Path]) -> None:
    _, src, dst = cifar
    ck = load_checkpoint(dst)
    u, d = ck.config.unet, ck.config.diffusion
    assert u.image_size == 32
    assert u.in_channels == 3
    assert u.ch == 128
    assert u.ch_mult == (1, 2, 2, 2)
    assert u.num_res_blocks == 2
    assert u.attn_resolutions == (16,)
    assert u.dropout == pytest.approx(0.1)
    assert u.norm_eps == pytest.approx(1e-6)
    assert u.downsample_padding == 0
    assert u.num_classes == 0
    assert d.variance_type == "fixed_large"
    assert d.clip_denoised is True
    assert d.num_timesteps == 1000
    assert d.beta_schedule == "linear"
    assert d.beta_start == pytest.approx(1e-4)
    assert d.beta_end == pytest.approx(0.02)
    assert ck.config.provenance["source"] == "diffusers"
    assert ck.config.provenance["imported_from"] == str(src.resolve())
    assert ck.config.provenance["weights_file"] == WEIGHTS
    assert ck.config.provenance["scheduler_config"] == "scheduler_config.json"
    assert not ck.net.training
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]


def test_cifar10_schedule_matches_diffusers(cifar: tuple[Any, Path, Path]) -> None:
    _, _, dst = cifar
    ck = load_checkpoint(dst)
    theirs = make_scheduler(CIFAR_SCHED).alphas_cumprod.double()
    assert (ck.schedule.alphas_cumprod.double() - theirs).abs().max() < 1e-6


# Other layouts (small model) -------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Any:
    return make_unet(SMALL_UNET, seed=1)


def test_pipeline_root_layout(small: Any, tmp_path: Path) -> None:
    src = tmp_path / "pipeline"
    save_unet_folder(src / "unet", small)
    make_scheduler(SMALL_SCHED).save_pretrained(src / "scheduler")
    dst = tmp_path / "out"
    convert_cli(src, dst)
    ck = load_checkpoint(dst)
    assert ck.config.diffusion.variance_type == "fixed_small"
    assert ck.config.unet.attn_resolutions == (8,)
    assert ck.config.unet.ch_mult == (1, 2)
    assert ck.config.unet.norm_groups == 8
    assert ck.config.provenance["scheduler_config"] == str(Path("scheduler/scheduler_config.json"))
    assert max_eps_diff(small, dst) < 1e-4


def test_pipeline_root_scheduler_in_parent(small: Any, tmp_path: Path) -> None:
    """SRC/unet/... with SRC/scheduler_config.json: convert the root and the unet folder."""
    src = tmp_path / "pipeline"
    save_unet_folder(src / "unet", small)
    make_scheduler(SMALL_SCHED).save_pretrained(src)
    assert (src / "scheduler_config.json").is_file()
    for name, arg in (("from_root", src), ("from_unet", src / "unet")):
        dst = tmp_path / name
        convert_cli(arg, dst)
        ck = load_checkpoint(dst)
        assert ck.config.diffusion.variance_type == "fixed_small", name
        assert max_eps_diff(small, dst) < 1e-4


def test_relative_dot_inside_the_unet_folder_finds_the_parents_scheduler(
    small: Any, tmp_path: Path
) -> None:
    src = tmp_path / "pipeline"
    save_unet_folder(src / "unet", small)
    make_scheduler({**SMALL_SCHED, "variance_type": "fixed_large"}).save_pretrained(src)
    r = subprocess.run([sys.executable, "-m", "ddpm", "convert", ".", "../out"],
                       capture_output=True, text=True, timeout=300, cwd=src / "unet")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(src / "out").config.diffusion.variance_type == "fixed_large"


def test_scheduler_variance_drives_config(small: Any, tmp_path: Path) -> None:
    """Same weights, two schedulers: the converted variance_type follows the scheduler."""
    for variance in ("fixed_large", "fixed_small_log"):
        src = tmp_path / variance
        save_unet_folder(src, small)
        make_scheduler({**SMALL_SCHED, "variance_type": variance}).save_pretrained(src)
        cfg = convert_diffusers(src, tmp_path / f"{variance}-out")
        assert cfg.diffusion.variance_type == variance.removesuffix("_log")


def test_bin_weights(small: Any, tmp_path: Path) -> None:
    src = save_unet_folder(tmp_path / "bin", small, safe=False)
    assert not (src / WEIGHTS).exists()
    make_scheduler(SMALL_SCHED).save_pretrained(src)
    dst = tmp_path / "out"
    convert_cli(src, dst)
    assert load_checkpoint(dst).config.provenance["weights_file"] == BIN
    assert max_eps_diff(small, dst) < 1e-4


def test_old_attention_names(small: Any, tmp_path: Path) -> None:
    src = save_unet_folder(tmp_path / "old", small)
    state = load_file(str(src / WEIGHTS))
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
               ".to_out.0.": ".proj_attn."}
    old: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for new, was in renames.items():
            k = k.replace(new, was)
        old[k] = v
    renamed = [k for k in old if k not in state]
    assert any(".query." in k for k in renamed) and any(".proj_attn." in k for k in renamed)
    assert not any(".to_q." in k or ".to_out." in k for k in old)
    save_file(old, str(src / WEIGHTS))
    make_scheduler(SMALL_SCHED).save_pretrained(src)
    dst = tmp_path / "out"
    convert_cli(src, dst)
    assert max_eps_diff(small, dst) < 1e-4


def test_no_scheduler_uses_ddpm_scheduler_defaults(small: Any, tmp_path: Path) -> None:
    src = save_unet_folder(tmp_path / "nosched", small)
    cfg = convert_diffusers(src, tmp_path / "out")
    assert cfg.diffusion.variance_type == "fixed_small"  # DDPMScheduler's default
    assert cfg.diffusion.num_timesteps == 1000
    assert cfg.provenance["scheduler_config"] is None


# Malicious and broken files --------------------------------------------------------------


class _Evil:
    """Unpickling this runs `fn(*args)`."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (self.fn, self.args)


def _evil_folder(small: Any, folder: Path, marker: Path, how: str) -> Path:
    small.save_config(folder)
    payload = (_Evil(os.system, f"touch '{marker}'") if how == "system"
               else _Evil(Path.touch, marker))
    torch.save({"conv_in.weight": payload}, folder / BIN)
    return folder


@pytest.mark.parametrize("how", ["system", "touch"])
def test_malicious_bin_is_refused(small: Any, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "PWNED"
    src = _evil_folder(small, tmp_path / "evil", marker, how)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, dst)
    assert type(exc.value) is CheckpointError
    msg = str(exc.value)
    assert "refused" in msg
    assert BIN in msg
    assert str(src / BIN) in msg
    assert not marker.exists()
    assert not (dst / "model.safetensors").exists()


def test_malicious_bin_via_cli(small: Any, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    src = _evil_folder(small, tmp_path / "evil", marker, "system")
    r = ddpm("convert", src, tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert "refused" in r.stderr
    assert BIN in r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_truncated_bin(small: Any, tmp_path: Path) -> None:
    src = save_unet_folder(tmp_path / "bin", small, safe=False)
    data = (src / BIN).read_bytes()
    (src / BIN).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, tmp_path / "out")
    assert str(src / BIN) in str(exc.value)


def test_garbage_safetensors(small: Any, tmp_path: Path) -> None:
    src = save_unet_folder(tmp_path / "garbage", small)
    (src / WEIGHTS).write_bytes(b"not safetensors" * 50)
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, tmp_path / "out")
    assert str(src / WEIGHTS) in str(exc.value)


def test_missing_weights_file(small: Any, tmp_path: Path) -> None:
    src = tmp_path / "noweights"
    small.save_config(src)
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, tmp_path / "out")
    assert str(src) in str(exc.value)
    assert "diffusion_pytorch_model" in str(exc.value)
    r = ddpm("convert", src, tmp_path / "out")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_missing_config_json(tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.mkdir()
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, tmp_path / "out")
    assert str(src / "config.json") in str(exc.value)


def test_weights_of_another_architecture(small: Any, tmp_path: Path) -> None:
    """config.json says one thing, the weights another: a clear error, not a torch one."""
    src = save_unet_folder(tmp_path / "mismatch", small)
    other = make_unet({**SMALL_UNET, "block_out_channels": (32, 32)})
    other.save_pretrained(tmp_path / "other")
    (src / WEIGHTS).write_bytes((tmp_path / "other" / WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, tmp_path / "out")
    assert str(src / WEIGHTS) in str(exc.value)


# Refused configurations ------------------------------------------------------------------


def _small_json(**changes: Any) -> dict[str, Any]:
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL_UNET.items()}
    d["_class_name"] = "UNet2DModel"
    d.update(changes)
    return d


def test_small_config_is_accepted() -> None:
    u = unet_config_from_diffusers(_small_json())
    assert (u.image_size, u.ch, u.ch_mult, u.num_res_blocks) == (16, 32, (1, 2), 1)
    assert u.attn_resolutions == (8,)
    # attention_head_dim equal to the channels is one head too.
    assert unet_config_from_diffusers(_small_json(attention_head_dim=64)) == u


@pytest.mark.parametrize(("changes", "key"), [
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"freq_shift": 0}, "freq_shift"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"num_class_embeds": 10}, "num_class_embeds"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DModel"),
    ({"down_block_types": ["DownBlock2D", "SkipDownBlock2D"]}, "SkipDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "does not mirror"),
])
def test_unsupported_unet_config(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        unet_config_from_diffusers(_small_json(**changes))


@pytest.mark.parametrize("key", ["flip_sin_to_cos", "attention_head_dim", "freq_shift"])
def test_omitted_key_means_diffusers_default(key: str) -> None:
    """A key left out means UNet2DModel's default, which is not the DDPM architecture."""
    cfg = _small_json()
    del cfg[key]
    with pytest.raises(ConfigError, match=key):
        unet_config_from_diffusers(cfg)


@pytest.mark.parametrize(("changes", "key"), [
    ({"prediction_type": "v_prediction"}, "prediction_type"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
    ({"trained_betas": [0.1] * 10}, "trained_betas"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"thresholding": True}, "thresholding"),
    ({"clip_sample_range": 0.5}, "clip_sample_range"),
])
def test_unsupported_scheduler_config(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        diffusion_config_from_diffusers({**CIFAR_SCHED, **changes})


def test_scheduler_config_is_read() -> None:
    d = diffusion_config_from_diffusers(CIFAR_SCHED)
    assert (d.num_timesteps, d.variance_type, d.clip_denoised) == (1000, "fixed_large", True)
    d = diffusion_config_from_diffusers({**CIFAR_SCHED, "clip_sample": False,
                                         "beta_schedule": "squaredcos_cap_v2"})
    assert (d.clip_denoised, d.beta_schedule) == (False, "cosine")


def test_multi_head_refused_by_convert(tmp_path: Path) -> None:
    model = make_unet({**SMALL_UNET, "attention_head_dim": 8})
    src = save_unet_folder(tmp_path / "heads", model)
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, tmp_path / "out")
    msg = str(exc.value)
    assert str(src / "config.json") in msg
    assert "attention_head_dim" in msg
    assert not (tmp_path / "out").exists()


def test_omitted_attention_head_dim_refused_by_cli(small: Any, tmp_path: Path) -> None:
    src = save_unet_folder(tmp_path / "nohead", small)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["attention_head_dim"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = ddpm("convert", src, tmp_path / "out")
    assert r.returncode == 2
    assert "attention_head_dim" in r.stderr
    assert str(src / "config.json") in r.stderr
    assert "Traceback" not in r.stderr


def test_v_prediction_refused_by_convert(small: Any, tmp_path: Path) -> None:
    src = save_unet_folder(tmp_path / "v", small)
    make_scheduler({**SMALL_SCHED, "prediction_type": "v_prediction"}).save_pretrained(src)
    with pytest.raises(CheckpointError) as exc:
        convert_diffusers(src, tmp_path / "out")
    msg = str(exc.value)
    assert str(src / "scheduler_config.json") in msg
    assert "prediction_type" in msg
