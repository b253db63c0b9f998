"""Per-image random streams: image i of a request with seed s draws from its own stream.

As EDM's `StackedRandomGenerator`, the noise of an image depends on (s, i) alone, never on
the batch size or on what else shares the batch. Unlike one `torch.Generator` per image,
the stream is counter-based: the noise an image needs at step k is a pure function of
(key, k, element), computed for the whole batch in a few tensor operations, so a step
has no per-image Python loop, and the same seed gives the same noise on CPU and GPU.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch
from torch import Tensor


def image_seed(seed: int, index: int) -> int:
    """A 63-bit key for image `index` of a request seeded `seed` (any 64-bit ints)."""
    digest = hashlib.blake2b(struct.pack("<qq", seed, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _signed(c: int) -> int:
    return c - 2**64 if c >= 2**63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    """SplitMix64's finaliser: int64 multiplication wraps modulo 2⁶⁴ on every backend."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def counter_normal(keys: Tensor, counters: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise `[N x *shape]` (float32, on keys' device); row i depends only on
    (keys[i], counters[i]). Box–Muller on two 24-bit uniforms from one 64-bit hash per value.
    """
    n = math.prod(shape)
    stream = _mix(keys.long() ^ _mix(counters.long().to(keys.device) * _GOLDEN))   # [N]
    element = torch.arange(n, device=keys.device, dtype=torch.long) * _GOLDEN        # [n]
    h = _mix(stream[:, None] + element[None, :])                                     # [N x n]
    u1 = (_srl(h, 40) + 1).float() * 2.0**-24                                        # (0, 1]
    u2 = (_srl(h, 16) & 0xFFFFFF).float() * 2.0**-24                                 # [0, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.view(len(keys), *shape)


def image_noise(seed: int, index: int, counter: int, shape: tuple[int, ...],
                device: torch.device | str = "cpu") -> Tensor:
    """`[*shape]` noise of image `index` of request `seed` at `counter` (0 is x_T)."""
    key = torch.tensor([image_seed(seed, index)], device=device)
    return counter_normal(key, torch.tensor([counter], device=device), shape)[0]
