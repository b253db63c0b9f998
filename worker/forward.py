"""The network as the engine's batch calls it: bf16 autocast and channels-last on CUDA,
split into smaller forwards once memory ran out (Engine's out-of-memory retry)."""

from __future__ import annotations

import torch
from torch import Tensor


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
