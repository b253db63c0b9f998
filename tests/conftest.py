"""Shared fixtures: tiny random models on the CPU."""

from __future__ import annotations

import pytest
import torch

from models import UNet, preset


def tiny_net(seed: int = 0, **changes: object) -> UNet:
    """A random `tiny` UNet in eval mode; PyTorch's default init keeps ε non-trivial."""
    torch.manual_seed(seed)
    return UNet(preset("tiny").replace(**changes).unet).eval()


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def net() -> UNet:
    return tiny_net()


@pytest.fixture
def make_net():  # type: ignore[no-untyped-def]
    """Factory: `make_net(seed, **unet_changes)` builds another tiny network."""
    return tiny_net
