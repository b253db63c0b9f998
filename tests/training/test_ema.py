"""The EMA of the served weights, by value: ema ← decay · ema + (1 − decay) · net.

A swapped weight (decay where 1 − decay belongs) still trains and still serves a model that
differs from the raw weights, so only the arithmetic itself can catch it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.trainer import ema_decay_at, ema_update


class Tiny(nn.Module):
    def __init__(self, weight: float, bias: float, stat: float) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        with torch.no_grad():
            self.lin.weight.fill_(weight)
            self.lin.bias.fill_(bias)
        self.register_buffer("stat", torch.full((3,), stat))


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_update_moves_one_minus_decay_of_the_way(decay: float) -> None:
    ema, net = Tiny(1.0, -2.0, 0.0), Tiny(3.0, 4.0, 7.0)
    ema_update(ema, net, decay)
    expect_w = decay * 1.0 + (1 - decay) * 3.0
    expect_b = decay * -2.0 + (1 - decay) * 4.0
    assert torch.allclose(ema.lin.weight, torch.full((1, 2), expect_w), rtol=0, atol=1e-6)
    assert torch.allclose(ema.lin.bias, torch.full((1,), expect_b), rtol=0, atol=1e-6)
    assert torch.equal(ema.stat, net.stat), "buffers are copied, not averaged"
    assert torch.equal(net.lin.weight, torch.full((1, 2), 3.0)), "the raw weights are untouched"


def test_repeated_updates_follow_the_geometric_series() -> None:
    """k updates toward a fixed net leave decay^k of the initial gap."""
    ema, net = Tiny(0.0, 0.0, 0.0), Tiny(1.0, 1.0, 0.0)
    for _ in range(5):
        ema_update(ema, net, 0.8)
    assert ema.lin.weight[0, 0].item() == pytest.approx(1 - 0.8**5, abs=1e-6)


def test_the_decay_ramps_up_to_its_setting() -> None:
    assert [round(ema_decay_at(k, 0.999), 6) for k in (0, 1, 10, 90)] == \
        [0.1, round(2 / 11, 6), round(11 / 20, 6), 0.91]
    assert ema_decay_at(10**6, 0.999) == 0.999
