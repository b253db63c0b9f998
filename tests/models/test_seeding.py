"""The counter-based per-image noise: a function of (key, counter) alone, and normal."""

from __future__ import annotations

import torch

from models.seeding import counter_normal, image_noise, image_seed


def test_noise_is_standard_normal() -> None:
    keys = torch.tensor([image_seed(3, i) for i in range(512)])
    z = counter_normal(keys, torch.zeros(512, dtype=torch.long), (1, 8, 8)).flatten().double()
    # 32,768 values; each bound is about 4 standard errors of its statistic.
    assert abs(z.mean()) < 0.025 and abs(z.std() - 1) < 0.02
    assert abs((z**3).mean()) < 0.09 and abs((z**4).mean() - 3) < 0.22
    assert abs((z.abs() < 1).double().mean() - 0.6827) < 0.011   # P(|z| < 1) of a normal
    assert z.abs().max() > 3.5, "the tails must be there"


def test_a_row_depends_only_on_its_key_and_counter() -> None:
    keys = torch.tensor([11, 22, 33])
    counters = torch.tensor([0, 5, 7])
    batch = counter_normal(keys, counters, (3, 4, 4))
    alone = counter_normal(keys[1:2], counters[1:2], (3, 4, 4))
    assert torch.equal(batch[1], alone[0])
    shuffled = counter_normal(keys.flip(0), counters.flip(0), (3, 4, 4))
    assert torch.equal(batch, shuffled.flip(0))


def test_other_keys_or_counters_give_other_noise() -> None:
    a = image_noise(1, 0, 0, (64,))
    assert torch.equal(a, image_noise(1, 0, 0, (64,)))
    for other in (image_noise(2, 0, 0, (64,)), image_noise(1, 1, 0, (64,)),
                  image_noise(1, 0, 1, (64,))):
        assert not torch.allclose(a, other)
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1]) < 0.5
