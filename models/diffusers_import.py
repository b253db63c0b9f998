"""Import diffusers-format DDPM checkpoints (UNet2DModel + DDPMScheduler) as native ones.

The published google/ddpm-* repositories hold a UNet2DModel folder (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`) and a `scheduler_config.json`, either
beside it or in the pipeline root (`scheduler/`). Only configurations that are exactly the
DDPM architecture are accepted; anything else is refused with the reason, rather than
imported as a different network. `.bin` files are read with `weights_only=True`, which
refuses any pickle that holds more than tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError, load_state_dict, save_checkpoint
from .config import ConfigError, DiffusionConfig, ModelConfig, UNetConfig
from .unet import UNet

# UNet2DModel's constructor defaults: a key left out of config.json means these.
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None,
}
# DDPMScheduler's defaults.
_SCHED_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
    "beta_schedule": "linear", "variance_type": "fixed_small", "clip_sample": True,
    "prediction_type": "epsilon", "trained_betas": None, "rescale_betas_zero_snr": False,
    "thresholding": False, "clip_sample_range": 1.0,
}
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
              "fixed_large": "fixed_large", "fixed_large_log": "fixed_large"}
_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    """The native architecture equal to a UNet2DModel config; `ConfigError` if none is."""
    c = {**_UNET_DEFAULTS, **cfg}
    cls = c.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ConfigError(f"_class_name is {cls!r}; only UNet2DModel is supported")
    boc = [int(v) for v in c["block_out_channels"]]
    levels = len(boc)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise ConfigError("down/up_block_types must have one entry per block_out_channels")
    attn_levels = []
    for i, kind in enumerate(down):
        mirror = up[levels - 1 - i]
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ConfigError(f"down block {kind!r} is not part of the DDPM architecture")
        if mirror != kind.replace("Down", "Up"):
            raise ConfigError(f"up block {mirror!r} does not mirror down block {kind!r}")
        if kind == "AttnDownBlock2D":
            attn_levels.append(i)
    requirements = {
        "center_input_sample": False, "time_embedding_type": "positional",
        "time_embedding_dim": None, "flip_sin_to_cos": False, "freq_shift": 1,
        "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
        "act_fn": "silu", "attn_norm_num_groups": None, "resnet_time_scale_shift": "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    }
    for key, want in requirements.items():
        if c[key] != want:
            raise ConfigError(f"{key}={c[key]!r} is not supported (the DDPM UNet has {want!r})")
    head = c["attention_head_dim"]
    for ch in [boc[i] for i in attn_levels] + [boc[-1]]:
        if head is not None and head != ch:
            raise ConfigError(
                f"attention_head_dim={head} gives {ch // head} heads at {ch} channels; "
                "the DDPM UNet has one head (attention_head_dim null)"
            )
    if c["in_channels"] != c["out_channels"]:
        raise ConfigError("in_channels and out_channels differ")
    size = c["sample_size"]
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ConfigError(f"non-square sample_size {size} is not supported")
        size = size[0]
    if size is None:
        raise ConfigError("sample_size is required")
    ch = boc[0]
    if any(b % ch for b in boc):
        raise ConfigError(f"block_out_channels {boc} are not multiples of {ch}")
    return UNetConfig(
        image_size=int(size), in_channels=int(c["in_channels"]), ch=ch,
        ch_mult=tuple(b // ch for b in boc), num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=tuple(int(size) >> i for i in attn_levels),
        dropout=float(c["dropout"]), norm_groups=int(c["norm_num_groups"]),
        norm_eps=float(c["norm_eps"]), downsample_padding=int(c["downsample_padding"]),
    )


def diffusion_config_from_diffusers(cfg: dict[str, Any]) -> DiffusionConfig:
    """The native schedule of a DDPMScheduler config; `ConfigError` if unsupported."""
    c = {**_SCHED_DEFAULTS, **cfg}
    if c["prediction_type"] != "epsilon":
        raise ConfigError(f"prediction_type={c['prediction_type']!r}; only epsilon is supported")
    if c["trained_betas"] is not None:
        raise ConfigError("trained_betas are not supported")
    for key in ("rescale_betas_zero_snr", "thresholding"):
        if c[key]:
            raise ConfigError(f"{key}=true is not supported")
    if c["clip_sample"] and float(c["clip_sample_range"]) != 1.0:
        raise ConfigError(f"clip_sample_range={c['clip_sample_range']} is not supported (1.0)")
    if c["beta_schedule"] not in _SCHEDULES:
        raise ConfigError(f"beta_schedule={c['beta_schedule']!r} is not supported")
    if c["variance_type"] not in _VARIANCES:
        raise ConfigError(f"variance_type={c['variance_type']!r} is not supported")
    return DiffusionConfig(
        num_timesteps=int(c["num_train_timesteps"]),
        beta_schedule=_SCHEDULES[c["beta_schedule"]],  # type: ignore[arg-type]
        beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]),
        variance_type=_VARIANCES[c["variance_type"]],  # type: ignore[arg-type]
        clip_denoised=bool(c["clip_sample"]),
    )


def diffusers_key(native: str, levels: int) -> str:
    """The diffusers state-dict name of a native parameter name."""
    k = native
    k = re.sub(r"^time_mlp\.0\.", "time_embedding.linear_1.", k)
    k = re.sub(r"^time_mlp\.2\.", "time_embedding.linear_2.", k)
    k = re.sub(r"^down\.(\d+)\.", r"down_blocks.\1.", k)
    k = re.sub(r"^up\.(\d+)\.", lambda m: f"up_blocks.{levels - 1 - int(m[1])}.", k)
    k = re.sub(r"^mid\.res1\.", "mid_block.resnets.0.", k)
    k = re.sub(r"^mid\.res2\.", "mid_block.resnets.1.", k)
    k = re.sub(r"^mid\.attn\.", "mid_block.attentions.0.", k)
    k = re.sub(r"\.res\.(\d+)\.", r".resnets.\1.", k)
    k = re.sub(r"\.attn\.(\d+)\.", r".attentions.\1.", k)
    resampler = ".downsamplers.0.conv." if k.startswith("down_") else ".upsamplers.0.conv."
    k = k.replace(".resample.conv.", resampler)
    k = k.replace(".temb_proj.", ".time_emb_proj.").replace(".skip.", ".conv_shortcut.")
    if ".attentions." in k:
        k = re.sub(r"\.norm\.", ".group_norm.", k)
        k = re.sub(r"\.q\.", ".to_q.", k)
        k = re.sub(r"\.k\.", ".to_k.", k)
        k = re.sub(r"\.v\.", ".to_v.", k)
        k = re.sub(r"\.proj\.", ".to_out.0.", k)
    k = re.sub(r"^norm_out\.", "conv_norm_out.", k)
    return k


_OLD_ATTN = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
             ".to_out.0.": ".proj_attn."}


def state_dict_from_diffusers(
    cfg: UNetConfig, state: dict[str, Tensor], file: Path
) -> dict[str, Tensor]:
    """Rename a diffusers UNet2DModel state dict to the native layout of `cfg`."""
    expected = _native_shapes(cfg)
    levels = len(cfg.ch_mult)
    out: dict[str, Tensor] = {}
    used = set()
    for native, shape in expected.items():
        key = diffusers_key(native, levels)
        candidates = [key] + [key.replace(new, old) for new, old in _OLD_ATTN.items() if new in key]
        found = next((k for k in candidates if k in state), None)
        if found is None:
            raise CheckpointError(f"{file}: missing tensor {key!r}")
        t = state[found]
        if found.endswith(("query.weight", "key.weight", "value.weight", "proj_attn.weight")) \
                and t.ndim == 4:
            t = t[:, :, 0, 0]  # some old files store the projections as 1×1 convs
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{file}: {found!r} has shape {tuple(t.shape)}, expected {shape}")
        out[native] = t
        used.add(found)
    extra = sorted(set(state) - used)
    if extra:
        raise CheckpointError(f"{file}: {len(extra)} unexpected tensors (e.g. {extra[:3]})")
    return out


def _native_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = UNet(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _read_json(file: Path) -> dict[str, Any]:
    try:
        doc = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return doc


def _load_bin(file: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused: the pickle holds more than tensors ({str(e).splitlines()[0]})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch weights file ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a flat mapping of names to tensors")
    return state


def find_diffusers_files(src: Path) -> tuple[Path, Path, Path | None]:
    """(UNet config.json, weights file, scheduler_config.json or None) under `src`."""
    unet_dir = src / "unet" if (src / "unet" / "config.json").is_file() else src
    config = unet_dir / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: not found (expected a diffusers UNet2DModel folder)")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (unet_dir / name).is_file():
            weights = unet_dir / name
            break
    else:
        raise CheckpointError(f"{unet_dir}: no diffusion_pytorch_model.safetensors or .bin")
    sched = next((p for p in (
        unet_dir / "scheduler_config.json",
        unet_dir.parent / "scheduler_config.json",
        unet_dir.parent / "scheduler" / "scheduler_config.json",
    ) if p.is_file()), None)
    return config, weights, sched


def convert_diffusers(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> ModelConfig:
    """Convert the diffusers checkpoint at `src` into a native checkpoint at `dst`."""
    src = Path(src).resolve()  # so that the parent of "." is the real parent folder
    config_file, weights_file, sched_file = find_diffusers_files(src)
    try:
        unet_cfg = unet_config_from_diffusers(_read_json(config_file))
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    sched_doc = _read_json(sched_file) if sched_file else {}
    try:
        diff_cfg = diffusion_config_from_diffusers(sched_doc)
    except ConfigError as e:
        raise CheckpointError(f"{sched_file}: {e}") from None
    if weights_file.suffix == ".bin":
        raw = _load_bin(weights_file)
    else:
        raw = load_state_dict(weights_file)
    state = state_dict_from_diffusers(unet_cfg, raw, weights_file)
    net = UNet(unet_cfg)
    net.load_state_dict(state)
    config = ModelConfig(unet=unet_cfg, diffusion=diff_cfg, provenance={
        "source": "diffusers",
        "imported_from": str(src),
        "weights_file": weights_file.name,
        "scheduler_config": str(sched_file.relative_to(src)) if sched_file and
        sched_file.is_relative_to(src) else (str(sched_file) if sched_file else None),
    })
    save_checkpoint(dst, net, config)
    return config
