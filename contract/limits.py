"""Every bound of a request, and the names of its choices: one definition that the
request rules, the OpenAPI schema, the OpenAI routes, `ddpm sample` and the worker read."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

# ---------------------------------------------------------------------------------------
# Limits: every request field is bounded.

MAX_IMAGES = 64                 # images per request
MAX_STEPS = 1000                # denoising steps (also capped by the model's T)
MAX_SNAPSHOT_EVERY = MAX_STEPS
MAX_GUIDANCE = 20.0
MAX_CLASS_LABEL = 9999
MAX_SEED = 2**63 - 1
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_JUMP_LENGTH = 100           # RePaint resampling: timesteps per jump back
MAX_JUMP_N_SAMPLE = 20          # RePaint resampling: passes over each jump

Sampler = Literal["ddpm", "ddim", "dpm++2m"]
SnapshotKind = Literal["x0", "xt"]
SnapshotFormat = Literal["png", "webp", "jpeg"]
SNAPSHOT_FORMATS: tuple[SnapshotFormat, ...] = get_args(SnapshotFormat)
LOSSY_FORMATS: frozenset[str] = frozenset({"webp", "jpeg"})
MAX_PREVIEW_SIDE = 1024
MIN_SNAPSHOT_SIZE = 8           # pixels a side of a preview frame
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")   # dequeue order

# Image-conditioned generation. The images travel beside the job, fitted to the model, as
# PNGs under input_key(job, field) (contract/inputs.py fits them); the spec names each by its
# digest, so the RQ payload stays small JSON.
Kind = Literal["generate", "img2img", "inpaint", "interpolate"]
InputField = Literal["init_image", "mask", "interpolate_to"]
INPUT_FIELDS: tuple[InputField, ...] = get_args(InputField)
INPUT_REF_PATTERN = r"^sha256:[0-9a-f]{64}$"
# strength when a request leaves it out: SDEdit's usual 0.75, the paper's t = 500 of 1000
# for interpolation (Ho et al. 2020 §4.4), and pure noise for inpainting (RePaint).
DEFAULT_STRENGTH: dict[Kind, float] = {"generate": 1.0, "img2img": 0.75, "inpaint": 1.0,
                                       "interpolate": 0.5}
InputRef = Annotated[str, Field(pattern=INPUT_REF_PATTERN,
                                description="digest of the fitted input image")]


# Entries a job's stream keeps (XADD MAXLEN ~): the default of DDPM_STREAM_MAXLEN, which
# the workers' and the API's settings both read, so both trim alike.
STREAM_MAXLEN = 2000
# Bytes of snapshot frames a job's stream keeps (DDPM_STREAM_MAX_BYTES, both sides): past
# it the oldest frames are deleted as new ones arrive, and the API refuses a request whose
# frames alone would exceed it (GenerationSpec.check_stream_budget).
STREAM_MAX_BYTES = 8 * 2**20
