"""Per-image random streams: image i of a request with seed s draws from its own generator.

As EDM's `StackedRandomGenerator`: the noise of an image depends on (s, i) alone, never on
the batch size or on what else shares the batch.
"""

from __future__ import annotations

import hashlib
import struct

import torch


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a request seeded `seed` (any 64-bit ints)."""
    digest = hashlib.blake2b(struct.pack("<qq", seed, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded by `image_seed(seed, index)`."""
    g = torch.Generator(device=device)
    g.manual_seed(image_seed(seed, index))
    return g
