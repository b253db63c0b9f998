"""A resident model (`LoadedModel`: its checkpoint and what the worker advertises), and its
network as the engine's batch calls it (`Forward`: bf16 autocast and channels-last on CUDA,
split into smaller forwards once memory ran out: Engine's out-of-memory retry)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from contract.spec import ModelInfo
from models import Checkpoint


@dataclass
class LoadedModel:
    """A resident model: the network on its device and what the worker advertises."""

    name: str
    checkpoint: Checkpoint
    info: ModelInfo
    load_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, name: str, ckpt: Checkpoint, load_seconds: float) -> LoadedModel:
        u, d = ckpt.config.unet, ckpt.config.diffusion
        info = ModelInfo(name=name, image_size=u.image_size, in_channels=u.in_channels,
                         num_timesteps=d.num_timesteps, num_classes=u.num_classes,
                         class_names=list(ckpt.config.class_names),
                         parameters=sum(p.numel() for p in ckpt.net.parameters()))
        return cls(name=name, checkpoint=ckpt, info=info, load_seconds=load_seconds)


class Forward:
    """The network as the batch calls it: bf16 autocast and channels-last on CUDA, and
    split into chunks of at most `chunk` rows once an out-of-memory error has been seen.
    """

    def __init__(self, net: torch.nn.Module, device: torch.device, *, bf16: bool,
                 channels_last: bool) -> None:
        self.net = net
        self.device = device
        self.bf16 = bf16 and device.type == "cuda"
        self.channels_last = channels_last and device.type == "cuda"
        self.chunk: int | None = None
        self.last_rows = 0                  # rows of the latest call (guided rows count twice)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = self.last_rows = len(x)
        size = self.chunk or n
        outs = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for lo in range(0, n, size):
                sl = slice(lo, lo + size)
                outs.append(self.net(x[sl], t[sl], None if y is None else y[sl]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.float().contiguous()
