"""Forward process statistics and the training loss."""

from __future__ import annotations

import pytest
import torch

from models import DiffusionConfig, Schedule, predict_x0, q_sample, training_loss


@pytest.fixture
def schedule() -> Schedule:
    return Schedule.from_config(DiffusionConfig())


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_has_the_marginal_mean_and_variance(schedule: Schedule, t: int) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 0.6)
    tt = torch.full((20000,), t)
    x_t = q_sample(schedule, x0, tt, torch.randn(x0.shape, generator=g))
    ab = schedule.alphas_cumprod[t].item()
    assert x_t.mean().item() == pytest.approx(ab**0.5 * 0.6, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-5)


def test_predict_x0_inverts_q_sample(schedule: Schedule) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((8, 3, 4, 4), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 900, 999])
    x_t = q_sample(schedule, x0, t, noise)
    # At t = 999 √ᾱ ≈ 6e-3, so float32 rounding of x_t is amplified ~160×.
    assert torch.allclose(predict_x0(schedule, x_t, t, noise), x0, atol=2e-4)


def test_loss_is_zero_for_the_true_noise_and_positive_otherwise(schedule: Schedule) -> None:
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand((6, 1, 4, 4), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)

    def oracle(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[tt].float().view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    assert training_loss(oracle, schedule, x0, t=t, noise=noise).item() < 1e-8
    zero = training_loss(lambda x, tt: torch.zeros_like(x), schedule, x0, t=t, noise=noise)
    assert zero.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_loss_draws_t_and_noise_from_the_generator(schedule: Schedule) -> None:
    x0 = torch.zeros((4, 1, 4, 4))
    net = lambda x, t: x * 0.5  # noqa: E731
    a = training_loss(net, schedule, x0, generator=torch.Generator().manual_seed(3))
    b = training_loss(net, schedule, x0, generator=torch.Generator().manual_seed(3))
    c = training_loss(net, schedule, x0, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item() != c.item()


def test_loss_passes_labels_to_a_conditional_net(schedule: Schedule) -> None:
    seen = {}

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["y"] = y
        return torch.zeros_like(x)

    training_loss(net, schedule, torch.zeros((2, 1, 4, 4)), y=torch.tensor([3, 5]))
    assert seen["y"].tolist() == [3, 5]
