"""DDPM math in pure PyTorch: UNet, schedules, diffusion, samplers, checkpoints.

Imports nothing else of the project (DESIGN.md §2).
"""

from .batch import SlotBatch, SlotSpec, StepOutput, sample, sample_progressive
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write,
    init_checkpoint,
    load_checkpoint,
    read_config,
    resolve_device,
    save_checkpoint,
)
from .config import ARCHS, PRESETS, ConfigError, DiffusionConfig, ModelConfig, UNetConfig, preset
from .diffusion import predict_x0, q_sample, training_loss
from .images import from_uint8, make_grid, to_uint8
from .nullnet import NullNet
from .samplers import SAMPLER_NAMES, SamplerKind, sampler_kind
from .schedule import Schedule, cosine_betas, linear_betas, spaced_timesteps
from .seeding import counter_normal, image_noise, image_seed
from .unet import UNet, build_network, count_parameters, inference_memory_format

__all__ = [
    "ARCHS",
    "PRESETS",
    "SAMPLER_NAMES",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DiffusionConfig",
    "ModelConfig",
    "NullNet",
    "SamplerKind",
    "Schedule",
    "SlotBatch",
    "SlotSpec",
    "StepOutput",
    "UNet",
    "UNetConfig",
    "atomic_write",
    "build_network",
    "cosine_betas",
    "count_parameters",
    "counter_normal",
    "from_uint8",
    "image_noise",
    "image_seed",
    "inference_memory_format",
    "init_checkpoint",
    "linear_betas",
    "load_checkpoint",
    "make_grid",
    "predict_x0",
    "preset",
    "q_sample",
    "read_config",
    "resolve_device",
    "sample",
    "sample_progressive",
    "sampler_kind",
    "save_checkpoint",
    "spaced_timesteps",
    "to_uint8",
    "training_loss",
]
