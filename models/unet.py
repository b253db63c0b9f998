"""The DDPM UNet of Ho et al. 2020, following the original TensorFlow code layer for layer.

The network predicts ε from (x_t, t[, y]); it knows nothing of β or of sampling.
Shapes: x `[N x C x H x W]` float in model space ([-1, 1] for data), t `[N]` long,
y `[N]` long in 0..num_classes (num_classes is the null label of classifier-free guidance).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UNetConfig
from .nullnet import NullNet


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding `[N x dim]`: sin first, then cos; frequencies 10000^(-k/(half-1))."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + time projection, GroupNorm → SiLU → dropout → conv, + skip."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, c_out)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out: Tensor = self.skip(x) + h
        return out


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, c: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.q = nn.Linear(c, c)
        self.k = nn.Linear(c, c)
        self.v = nn.Linear(c, c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)              # [N x HW x C]
        q, k, v = (m(seq)[:, None] for m in (self.q, self.k, self.v))  # [N x 1 x HW x C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]          # scale 1/sqrt(C)
        y: Tensor = x + self.proj(out).transpose(1, 2).reshape(n, c, h, w)
        return y


class Downsample(nn.Module):
    """Stride-2 3×3 conv; padding 0 reproduces TF "SAME" (pad right and bottom by one)."""

    def __init__(self, c: int, padding: int) -> None:
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)
        return y


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return y


class Level(nn.Module):
    """One resolution of the UNet: ResNet blocks, attention where configured, a resampler."""

    def __init__(self, res: nn.ModuleList, attn: nn.ModuleList, resample: nn.Module) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample


class UNet(nn.Module):
    """ε_θ(x_t, t[, y]) with the architecture of `cfg`."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, temb_ch = cfg.ch, cfg.ch * 4
        chans = [ch * m for m in cfg.ch_mult]
        levels = len(chans)

        self.time_mlp = nn.Sequential(
            nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch)
        )
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_ch) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attn(c: int, level: int) -> nn.Module:
            size = cfg.image_size >> level
            return AttnBlock(c, cfg) if size in cfg.attn_resolutions else nn.Identity()

        # Downsampling: record the channels of every activation pushed onto the skip stack.
        skip_ch = [ch]
        self.down = nn.ModuleList()
        c = ch
        for i, c_out in enumerate(chans):
            res, att = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                res.append(ResBlock(c, c_out, temb_ch, cfg))
                att.append(attn(c_out, i))
                c = c_out
                skip_ch.append(c)
            last = i == levels - 1
            self.down.append(Level(res, att, nn.Identity() if last else
                                   Downsample(c, cfg.downsample_padding)))
            if not last:
                skip_ch.append(c)

        self.mid = nn.ModuleDict({
            "res1": ResBlock(c, c, temb_ch, cfg),
            "attn": AttnBlock(c, cfg),
            "res2": ResBlock(c, c, temb_ch, cfg),
        })

        # Upsampling: self.up[i] is level i (the original code's `up.{i}`), run from deepest.
        up: list[Level] = [None] * levels  # type: ignore[list-item]
        for i in reversed(range(levels)):
            res, att = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResBlock(c + skip_ch.pop(), chans[i], temb_ch, cfg))
                att.append(attn(chans[i], i))
                c = chans[i]
            up[i] = Level(res, att, Upsample(c) if i != 0 else nn.Identity())
        self.up = nn.ModuleList(up)

        self.norm_out = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    @property
    def null_label(self) -> int | None:
        """The label index that means "no class" (classifier-free guidance), if conditional."""
        return self.cfg.num_classes if self.cfg.num_classes else None

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.cfg.ch))
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.cfg.num_classes)
            temb = temb + self.label_emb(y)

        hs = [self.conv_in(x)]
        for level in cast("Iterable[Level]", self.down):   # ModuleLists of Level
            for res, att in zip(level.res, level.attn, strict=True):
                hs.append(att(res(hs[-1], temb)))
            if not isinstance(level.resample, nn.Identity):
                hs.append(level.resample(hs[-1]))

        h = self.mid["res1"](hs[-1], temb)
        h = self.mid["res2"](self.mid["attn"](h), temb)

        for level in cast("Iterable[Level]", reversed(self.up)):
            for res, att in zip(level.res, level.attn, strict=True):
                h = att(res(torch.cat([h, hs.pop()], dim=1), temb))
            h = level.resample(h)

        eps: Tensor = self.conv_out(F.silu(self.norm_out(h)))
        return eps.contiguous()                            # whatever the layout


def build_network(cfg: UNetConfig) -> nn.Module:
    """The ε network that `cfg` describes: the DDPM UNet, or `NullNet` for `arch="null"`.
    Build networks with this (not `UNet(...)`) wherever the config may be any preset."""
    return NullNet(cfg) if cfg.arch == "null" else UNet(cfg)


# Base widths (`UNetConfig.ch`) from which channels-last pays on the CPU. Measured with one
# torch thread, ms per forward channels-last / contiguous (BENCHMARKS.md §16): ch 8 (the
# 10k-parameter 8x8 UNet) 1.30-1.67x slower channels-last, ch 16 (mnist's shape) 1.20-1.24x;
# ch 32 (tiny) 0.83x, mnist 0.98x, cifar10 0.97-1.00x.
CHANNELS_LAST_MIN_CH = 32


def inference_memory_format(device: torch.device | str, unet: UNetConfig
                            ) -> torch.memory_format:
    """The layout of the weights in which the UNet `unet` infers fastest on `device`.

    CPU: channels-last from CHANNELS_LAST_MIN_CH channels. oneDNN convolutions work in
    NHWC, so NCHW weights cost a reorder of every convolution's input and output (~10% of
    a cifar10 forward at batch 16 and more), and channels-last activations make the
    attention's [N x HW x C] views copy-free; a narrow network gains nothing there and
    loses in GroupNorm's channels-last kernel (20% of a worker's CPU on the 8-channel UNet).
    Elsewhere the default: the worker chooses channels-last for CUDA itself (with bf16).
    A rule, not a timing, so `ddpm sample` and the worker compute the same bits.
    For `load_checkpoint(..., for_inference=True)` or `net.to(memory_format=...)`.
    """
    if torch.device(device).type == "cpu" and unet.ch >= CHANNELS_LAST_MIN_CH:
        return torch.channels_last
    return torch.contiguous_format


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
