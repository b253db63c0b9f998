"""A running job's resume state as bytes: its layout, its checks and its size bound.

A worker that stops (drain) or checkpoints writes, per job, one value under
`keys.resume_key(job)`; whichever worker takes the job next continues every image from it
(worker/resume.py turns it into the engine's state and back). Torch-free: the arrays travel
as raw bytes, so the API and tools can read the header and size without torch.

Layout (version 1), all little-endian:

    8 bytes   MAGIC: b"DDPMRS" + version (u16)
    4 bytes   u32 H: the header's length
    H bytes   the header, compact JSON: {"identity": {...}, "done": [i, ...],
              "running": [[i, pos, prev], ...]}
    then      per running image, in header order: x, then x̂0_prev if prev = 1; each
              C·H·W float32 values (the exact values the sampler keeps, no rounding)

`identity` is what the state belongs to: the model's name, image size, channels,
timesteps and parameter count, and the request's digest, images, steps, steps per image,
seed and sampler. `decode` refuses a state whose identity, layout or positions do not fit
the job and model at hand (`ResumeStateError`): the job then restarts from step 0, as a
job without state does, rather than continuing from the wrong numbers.

Size: (one or two arrays per running image) × C·H·W·4 + the header. `state_bytes` is an
upper bound from the spec alone (every image running, each with x̂0_prev where its sampler
may read one), so a job over `DDPM_RESUME_MAX_BYTES` is known before any write.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from .spec import GenerationSpec, ModelInfo

VERSION = 1
MAGIC = b"DDPMRS" + struct.pack("<H", VERSION)
_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _LEN.size

# The default of DDPM_RESUME_MAX_BYTES: a job's state above it is not written (the job
# restarts from step 0 when it comes back, as before). 16 MiB holds every job of a 32- or
# 64-pixel RGB model (at most 64 images: 1.5 MiB and 6 MiB with DPM-Solver++'s second
# array) and a 256-pixel one up to 10 images with dpm++2m (1.5 MiB each), 21 with ddim or
# ddpm; twice the per-job frame budget (STREAM_MAX_BYTES), so a drain's one write of a
# full worker (max_batch running images, ≤ 1.5 MiB each at 256 px) stays a small part of
# a 2 GB Redis (compose's maxmemory), and one value is written in ~10 ms on a LAN.
RESUME_MAX_BYTES = 16 * 2**20


class ResumeStateError(ValueError):
    """A stored resume state this job cannot continue from (another model, request or
    layout, or damaged): the job restarts from step 0."""


@dataclass(frozen=True)
class RunningImage:
    """One image's slot state as bytes: `pos` steps done, x and maybe x̂0_prev (raw
    little-endian float32, C·H·W values each)."""

    index: int
    pos: int
    x: bytes
    x0_prev: bytes | None = None


@dataclass(frozen=True)
class ResumeRecord:
    """A job's images: done (final image emitted), running (their states), the rest not
    started."""

    done: tuple[int, ...]
    running: tuple[RunningImage, ...]

    def steps_done(self, steps_per_image: int) -> int:
        """Network steps the job has behind it, summed over its images (progress's
        `steps_done`): where a resumed job's progress continues from."""
        return len(self.done) * steps_per_image + sum(r.pos for r in self.running)


def identity(spec: GenerationSpec, info: ModelInfo) -> dict[str, Any]:
    """What a state belongs to; `decode` compares each field and names the first that
    differs."""
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
    return {"model": info.name, "image_size": info.image_size,
            "in_channels": info.in_channels, "num_timesteps": info.num_timesteps,
            "parameters": info.parameters, "num_images": spec.num_images,
            "steps": spec.steps, "steps_per_image": spec.steps_per_image, "seed": spec.seed,
            "sampler": spec.sampler, "spec": digest}


def array_bytes(info: ModelInfo) -> int:
    """Bytes of one image array (x or x̂0_prev): C·H·W float32."""
    return info.in_channels * info.image_size * info.image_size * 4


def encode(record: ResumeRecord, spec: GenerationSpec, info: ModelInfo) -> bytes:
    """The bytes of `record` for `spec` on the model `info` (ValueError if an array has
    the wrong size)."""
    size = array_bytes(info)
    arrays: list[bytes] = []
    for r in record.running:
        for a in (r.x, r.x0_prev):
            if a is not None and len(a) != size:
                raise ValueError(f"image {r.index}: an array of {len(a)} bytes, not {size}")
        arrays += [r.x] if r.x0_prev is None else [r.x, r.x0_prev]
    header = _header(identity(spec, info), list(record.done),
                     [[r.index, r.pos, int(r.x0_prev is not None)] for r in record.running])
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *arrays])


def decode(data: bytes, spec: GenerationSpec, info: ModelInfo) -> ResumeRecord:
    """The record in `data`, if it is a well-formed state of this job on this model;
    ResumeStateError saying why not otherwise."""
    if len(data) < _PREFIX or data[:6] != MAGIC[:6]:
        raise ResumeStateError("not a resume state")
    if data[:len(MAGIC)] != MAGIC:
        version = struct.unpack_from("<H", data, 6)[0]
        raise ResumeStateError(f"resume state version {version}; this worker reads {VERSION}")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    try:
        head = json.loads(data[_PREFIX:_PREFIX + n])
        ident, done, running = head["identity"], head["done"], head["running"]
    except (ValueError, KeyError, TypeError) as e:
        raise ResumeStateError(f"the resume state's header is unreadable ({e})") from None
    want = identity(spec, info)
    for key, value in want.items():
        if not isinstance(ident, dict) or ident.get(key) != value:
            got = ident.get(key) if isinstance(ident, dict) else None
            what = "another request" if key == "spec" else f"{key} {got!r}, not {value!r}"
            raise ResumeStateError(f"the resume state is for {what}")
    images = _check_images(done, running, spec)
    size = array_bytes(info)
    arrays = sum(1 + prev for _, _, prev in images)
    if len(data) != _PREFIX + n + arrays * size:
        raise ResumeStateError(f"the resume state is {len(data)} bytes; its header says "
                               f"{_PREFIX + n + arrays * size}")
    at, out = _PREFIX + n, []
    for index, pos, prev in images:
        x, at = data[at:at + size], at + size
        x0_prev = None
        if prev:
            x0_prev, at = data[at:at + size], at + size
        out.append(RunningImage(index, pos, bytes(x), None if x0_prev is None else bytes(x0_prev)))
    return ResumeRecord(done=tuple(done), running=tuple(out))


def state_bytes(spec: GenerationSpec, info: ModelInfo, running: int | None = None) -> int:
    """An upper bound of the bytes of this job's state on the model `info`, with at most
    `running` images running at once (default: all of them; a worker's max_batch bounds
    it): every array it could hold, and the longest header."""
    n = spec.num_images if running is None else max(0, min(running, spec.num_images))
    prev = spec.sampler == "dpm++2m" or spec.resampling    # x̂0_prev may be read
    last, pos = spec.num_images - 1, spec.steps_per_image - 1
    header = _header(identity(spec, info), [last] * (spec.num_images - n),
                     [[last, pos, 1]] * n)
    return _PREFIX + len(header) + n * (1 + int(prev)) * array_bytes(info)


def _header(ident: dict[str, Any], done: list[int], running: list[list[int]]) -> bytes:
    return json.dumps({"identity": ident, "done": done, "running": running},
                      separators=(",", ":")).encode()


def _check_images(done: Any, running: Any, spec: GenerationSpec) -> list[tuple[int, int, int]]:
    """(index, pos, prev) of the running images, if the lists fit the spec."""
    def whole(v: Any) -> bool:
        return type(v) is int

    if not (isinstance(done, list) and all(whole(i) for i in done)
            and isinstance(running, list)
            and all(isinstance(r, list) and len(r) == 3 and all(whole(v) for v in r)
                    for r in running)):
        raise ResumeStateError("the resume state's image lists are malformed")
    images = [(r[0], r[1], r[2]) for r in running]
    indices = list(done) + [i for i, _, _ in images]
    if len(set(indices)) != len(indices) or not all(0 <= i < spec.num_images for i in indices):
        raise ResumeStateError(f"the resume state's images {sorted(indices)} are not distinct "
                               f"images of {spec.num_images}")
    for i, pos, prev in images:
        if not (0 <= pos < spec.steps_per_image and prev in (0, 1)):
            raise ResumeStateError(f"image {i}: step {pos} of {spec.steps_per_image}")
    return images
