"""Checkpoint format: a directory with `config.json` and `model.safetensors`.

`config.json` is a `ModelConfig` (architecture, schedule, class names, provenance) plus a
format tag; `model.safetensors` holds the (EMA) weights. Loading never unpickles. Writes
go to a temporary name and are renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .batch import SlotBatch
from .config import ConfigError, ModelConfig
from .schedule import Schedule
from .unet import build_network, inference_memory_format

FORMAT = "ddpm-serve/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with the offending file named in the message."""


class BatchOptions(TypedDict):
    """What a model's configuration fixes about sampling it: the keyword arguments of
    `SlotBatch`, `sample` and `sample_progressive` besides network, schedule and device."""

    shape: tuple[int, int, int]     # (C, H, W)
    num_classes: int
    clip_denoised: bool


def batch_options(config: ModelConfig) -> BatchOptions:
    """`config`'s `BatchOptions`: every sampling call site takes them from here
    (`Checkpoint.slot_batch` for a loaded checkpoint)."""
    u = config.unet
    return BatchOptions(shape=(u.in_channels, u.image_size, u.image_size),
                        num_classes=u.num_classes, clip_denoised=config.diffusion.clip_denoised)


@dataclass
class Checkpoint:
    """A loaded model: the network (eval mode), its config, and its noise schedule."""

    net: nn.Module             # `UNet`, or `NullNet` for a config of arch "null"
    config: ModelConfig
    schedule: Schedule
    path: Path

    @property
    def conditional(self) -> bool:
        return self.config.unet.num_classes > 0

    @property
    def batch_options(self) -> BatchOptions:
        """`batch_options(self.config)`: `sample(ck.net, ck.schedule, specs, device=...,
        **ck.batch_options)`."""
        return batch_options(self.config)

    def slot_batch(self, device: torch.device | str,
                   net: Callable[..., Tensor] | None = None) -> SlotBatch:
        """An empty `SlotBatch` of this model on `device`; `net` is the network as the batch
        calls it, when not `self.net` itself (the worker's autocast and chunking wrapper)."""
        return SlotBatch(self.net if net is None else net, self.schedule, device=device,
                         **self.batch_options)


def save_checkpoint(path: str | os.PathLike[str], net: nn.Module, config: ModelConfig) -> Path:
    """Write `net`'s weights and `config` into the directory `path` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT}
    atomic_write(path / WEIGHTS_FILE, lambda f: save_file(tensors, f, metadata=meta))
    doc = {"format": FORMAT, **config.to_dict()}
    atomic_write(path / CONFIG_FILE,
                  lambda f: Path(f).write_text(json.dumps(doc, indent=2) + "\n"))
    return path


def init_checkpoint(path: str | os.PathLike[str], config: ModelConfig, seed: int = 0) -> Path:
    """A checkpoint of `config` with freshly initialised weights (PyTorch's default init,
    seeded): a servable model for benchmarks, tests and trying the service out."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(config.unet).eval()
    return save_checkpoint(path, net, config)


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of the checkpoint directory `path`, without loading weights."""
    file = Path(path) / CONFIG_FILE
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (is {path} a checkpoint directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{file}: format is {found!r}, expected {FORMAT!r}")
    try:
        return ModelConfig.from_dict({k: v for k, v in doc.items() if k != "format"})
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def load_state_dict(file: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file; `CheckpointError` naming the file if it is unreadable."""
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def resolve_device(name: str) -> torch.device:
    """"auto" → CUDA when present, else CPU; ValueError for CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available")
    return torch.device(name)


def load_checkpoint(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    for_inference: bool = False,
) -> Checkpoint:
    """Load the checkpoint directory `path` onto `device`, ready for inference.

    `memory_format` is the layout of the convolution weights; `for_inference` takes the
    fastest for this network there instead (`inference_memory_format`). ε is the same up to
    float rounding, not bit for bit, so the default keeps the layout the weights were saved
    in."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = read_config(path)
    state = load_state_dict(path / WEIGHTS_FILE)
    net = build_network(config.unet)
    _load_into(net, state, path / WEIGHTS_FILE)
    if for_inference:
        memory_format = inference_memory_format(device, config.unet)
    # Module.to takes memory_format at run time; torch's stubs leave it out.
    net.to(device=device, dtype=dtype, memory_format=memory_format).eval()  # type: ignore[call-overload]
    return Checkpoint(net=net, config=config, schedule=Schedule.from_config(config.diffusion),
                      path=path)


def _load_into(net: nn.Module, state: dict[str, Tensor], file: Path) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected),
                           ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{file}: weights do not match config.json: {'; '.join(parts)}")
    net.load_state_dict(state)


def atomic_write(dest: Path, write: Callable[[str], object]) -> None:
    """Write via `write(tmp_path)` then rename, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; servers may run as another user
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
