"""Model and diffusion configuration: plain dataclasses that a checkpoint stores as JSON.

A checkpoint is self-describing (as nanoGPT's): its `config.json` holds these fields, and
`load_checkpoint` rebuilds the network from them alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

BetaSchedule = Literal["linear", "cosine"]
VarianceType = Literal["fixed_small", "fixed_large"]
Arch = Literal["ddpm", "null"]
ARCHS: tuple[Arch, ...] = get_args(Arch)


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the DDPM UNet (Ho et al. 2020, appendix B)."""

    image_size: int = 32                         # H = W of x, in pixels
    in_channels: int = 3                         # image channels (out channels are the same)
    ch: int = 128                                # base channel count
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)      # channels per level = ch * mult
    num_res_blocks: int = 2                      # ResNet blocks per level on the way down
    attn_resolutions: tuple[int, ...] = (16,)    # feature-map sizes that get self-attention
    dropout: float = 0.1                         # inside each ResNet block
    num_classes: int = 0                         # 0 = unconditional; else labels 0..n-1 + null
    norm_groups: int = 32                        # GroupNorm groups
    norm_eps: float = 1e-6                       # GroupNorm epsilon (TF default of the paper)
    downsample_padding: int = 0                  # 0: TF "SAME" (pad right/bottom), 1: symmetric
    arch: Arch = "ddpm"                          # "null": ε̂ = w·x, no layers (benchmarks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        levels = len(self.ch_mult)
        if levels < 1 or self.ch < 1 or self.num_res_blocks < 1 or self.in_channels < 1:
            raise ConfigError("ch, ch_mult, num_res_blocks and in_channels must be positive")
        if self.image_size % (2 ** (levels - 1)) != 0:
            raise ConfigError(
                f"image_size {self.image_size} must be divisible by 2**{levels - 1} "
                f"for {levels} levels"
            )
        for c in [self.ch, *(self.ch * m for m in self.ch_mult)]:
            if c % self.norm_groups != 0:
                raise ConfigError(f"{c} channels are not divisible by {self.norm_groups} groups")
        if self.downsample_padding not in (0, 1):
            raise ConfigError("downsample_padding must be 0 (asymmetric) or 1 (symmetric)")
        if self.num_classes < 0:
            raise ConfigError("num_classes must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout must be in [0, 1)")
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; choose from {', '.join(ARCHS)}")


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process and sampling defaults."""

    num_timesteps: int = 1000                    # T
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 1e-4                     # linear schedule only
    beta_end: float = 0.02                       # linear schedule only
    variance_type: VarianceType = "fixed_large"  # σ² of DDPM ancestral sampling: β or β̃
    clip_denoised: bool = True                   # clip x̂0 to [-1, 1] while sampling

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ConfigError("num_timesteps must be >= 1")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ConfigError(f"unknown beta_schedule {self.beta_schedule!r}")
        if self.variance_type not in ("fixed_small", "fixed_large"):
            raise ConfigError(f"unknown variance_type {self.variance_type!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError("need 0 < beta_start <= beta_end < 1")


@dataclass(frozen=True)
class ModelConfig:
    """Everything a checkpoint's `config.json` says about its model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    class_names: tuple[str, ...] = ()            # optional names of the labels 0..n-1
    provenance: dict[str, Any] = field(default_factory=dict)  # data, steps, hardware, source

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.class_names and len(self.class_names) != self.unet.num_classes:
            raise ConfigError(
                f"{len(self.class_names)} class names for {self.unet.num_classes} classes"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["unet"]["arch"] == "ddpm":    # the default: configs of real models stay as they were
            del d["unet"]["arch"]
        return {
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in d["unet"].items()},
            "diffusion": d["diffusion"],
            "class_names": list(self.class_names),
            "provenance": d["provenance"],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object")
        try:
            return cls(
                unet=_build(UNetConfig, d.get("unet", {})),
                diffusion=_build(DiffusionConfig, d.get("diffusion", {})),
                class_names=tuple(d.get("class_names", ())),
                provenance=dict(d.get("provenance", {})),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e

    def replace(self, **unet_changes: Any) -> ModelConfig:
        """A copy with some architecture fields changed (e.g. image_size for a test)."""
        return dataclasses.replace(self, unet=dataclasses.replace(self.unet, **unet_changes))


def _build(cls: type, d: Any) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**d)


# Presets: the paper's configurations, two small ones and a null one. ---------------------

PRESETS: dict[str, ModelConfig] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters, σ² = β.
    "cifar10": ModelConfig(
        unet=UNetConfig(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2),
                        num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
        diffusion=DiffusionConfig(variance_type="fixed_large"),
    ),
    # CelebA-HQ and LSUN 256×256: 114M parameters, σ² = β̃.
    "celebahq256": ModelConfig(
        unet=UNetConfig(image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4),
                        num_res_blocks=2, attn_resolutions=(16,), dropout=0.0),
        diffusion=DiffusionConfig(variance_type="fixed_small"),
    ),
    "lsun256": ModelConfig(
        unet=UNetConfig(image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4),
                        num_res_blocks=2, attn_resolutions=(16,), dropout=0.0),
        diffusion=DiffusionConfig(variance_type="fixed_small"),
    ),
    # MNIST digits at their own 28×28, class-conditional: 1.6M parameters, small enough to
    # train on a laptop CPU in about an hour and to sample a batch there in seconds.
    "mnist": ModelConfig(
        unet=UNetConfig(image_size=28, in_channels=1, ch=32, ch_mult=(1, 2, 2),
                        num_res_blocks=2, attn_resolutions=(7,), dropout=0.0, num_classes=10,
                        norm_groups=8),
        diffusion=DiffusionConfig(variance_type="fixed_small"),
        class_names=tuple(str(i) for i in range(10)),
    ),
    # For tests: well under 1M parameters.
    "tiny": ModelConfig(
        unet=UNetConfig(image_size=16, in_channels=3, ch=32, ch_mult=(1, 2),
                        num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, norm_groups=8),
        diffusion=DiffusionConfig(variance_type="fixed_large"),
    ),
    # For benchmarks: a forward of ~zero cost (ε̂ = w·x, one parameter, no layers), so a
    # benchmark shows the ceiling the serving stack itself sets, on any machine. 8×8 grey.
    # The UNet fields other than image_size, in_channels and num_classes are unused.
    "null": ModelConfig(
        unet=UNetConfig(image_size=8, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                        attn_resolutions=(), dropout=0.0, norm_groups=8, arch="null"),
        diffusion=DiffusionConfig(variance_type="fixed_large"),
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset; `ConfigError` listing the choices for an unknown name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}"
        ) from None
