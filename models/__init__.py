"""DDPM math in pure PyTorch: UNet, schedules, diffusion, samplers, checkpoints.

Imports nothing else of the project (ARCHITECTURE.md).
"""

from .batch import SlotBatch, SlotSpec, StepOutput, sample, sample_progressive
from .checkpoint import (
    BatchOptions,
    Checkpoint,
    CheckpointError,
    atomic_write,
    batch_options,
    init_checkpoint,
    load_checkpoint,
    read_config,
    resolve_device,
    save_checkpoint,
)
from .config import ARCHS, PRESETS, ConfigError, DiffusionConfig, ModelConfig, UNetConfig, preset
from .diffusion import predict_x0, q_sample, training_loss
from .images import from_uint8, make_grid, png_bytes, save_png, to_uint8
from .nullnet import NullNet
from .samplers import SAMPLER_NAMES, SamplerKind, sampler_kind
from .schedule import (
    Schedule,
    check_steps,
    cosine_betas,
    linear_betas,
    repaint_plan,
    spaced_timesteps,
    start_timestep,
)
from .seeding import counter_normal, image_noise, image_seed
from .unet import UNet, build_network, count_parameters, inference_memory_format

__all__ = [
    "ARCHS",
    "PRESETS",
    "SAMPLER_NAMES",
    "BatchOptions",
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
    "batch_options",
    "build_network",
    "check_steps",
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
    "png_bytes",
    "predict_x0",
    "preset",
    "q_sample",
    "read_config",
    "repaint_plan",
    "resolve_device",
    "sample",
    "sample_progressive",
    "sampler_kind",
    "save_checkpoint",
    "save_png",
    "spaced_timesteps",
    "start_timestep",
    "to_uint8",
    "training_loss",
]
