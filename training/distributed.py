"""`torchrun` support: the same `ddpm train` command runs on one process or on many."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Only rank 0 writes checkpoints, logs and grids."""
        return self.rank == 0


def setup(device: str) -> Dist:
    """Join the process group that `torchrun` describes in the environment, if any.

    NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, resolve_device(device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
