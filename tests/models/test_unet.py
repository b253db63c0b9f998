"""The UNet: the paper's parameter counts, the time embedding, shapes, conditioning."""

from __future__ import annotations

import math

import pytest
import torch

from models import ConfigError, UNet, UNetConfig, count_parameters, preset
from models.unet import timestep_embedding


def meta_net(name: str) -> UNet:
    with torch.device("meta"):
        return UNet(preset(name).unet)


def test_cifar10_preset_has_the_papers_35_7m_parameters() -> None:
    n = count_parameters(meta_net("cifar10"))
    assert abs(n - 35.7e6) <= 0.05e6
    assert n == 35_746_307  # the original TF code's count


def test_256px_presets_have_the_papers_114m_parameters() -> None:
    assert count_parameters(meta_net("celebahq256")) == 113_673_219
    assert count_parameters(meta_net("lsun256")) == 113_673_219


def test_tiny_preset_is_under_a_million_parameters() -> None:
    assert count_parameters(meta_net("tiny")) < 1_000_000


def test_timestep_embedding_is_sin_then_cos_with_paper_frequencies() -> None:
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 8)
    half = 4
    for row, tv in enumerate(t.tolist()):
        for k in range(half):
            f = math.exp(-math.log(10000) * k / (half - 1))
            assert emb[row, k].item() == pytest.approx(math.sin(tv * f), abs=1e-4)
            assert emb[row, half + k].item() == pytest.approx(math.cos(tv * f), abs=1e-4)


@pytest.mark.parametrize("name", ["tiny", "mnist"])
def test_output_has_the_input_shape(name: str) -> None:
    cfg = preset(name).unet
    net = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    eps = net(x, torch.tensor([0, 999]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_conditional_net_uses_labels_and_defaults_to_the_null_label() -> None:
    torch.manual_seed(0)
    net = UNet(preset("tiny").replace(num_classes=3).unet).eval()
    assert net.null_label == 3
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 500])
    a = net(x, t, torch.tensor([0, 0]))
    b = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    assert torch.allclose(net(x, t), net(x, t, torch.tensor([3, 3])))


def test_each_sample_is_computed_independently_of_its_batch() -> None:
    torch.manual_seed(0)
    net = UNet(preset("tiny").unet).eval()
    x, t = torch.randn(5, 3, 16, 16), torch.tensor([0, 3, 200, 600, 999])
    together = net(x, t)
    alone = torch.cat([net(x[i : i + 1], t[i : i + 1]) for i in range(5)])
    assert (together - alone).abs().max() < 1e-5


@pytest.mark.parametrize("bad", [
    {"image_size": 30, "ch_mult": (1, 2, 2)},
    {"ch": 48},
    {"downsample_padding": 2},
    {"dropout": 1.5},
])
def test_invalid_architectures_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        UNetConfig(**bad)
