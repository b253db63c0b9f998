"""The resume state's bytes, torch-free: layout, refusals, and the size bound known from
the spec alone (tests/worker/test_resume_state.py round-trips real engine states; this
module's name differs from tests/models/test_resume.py: test modules share one namespace)."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest

from contract.keys import resume_key
from contract.resume import (
    MAGIC,
    RESUME_MAX_BYTES,
    ResumeRecord,
    ResumeStateError,
    RunningImage,
    array_bytes,
    decode,
    encode,
    state_bytes,
)
from contract.spec import GenerationSpec, ModelInfo

INFO = ModelInfo(name="m", image_size=32, in_channels=3, num_timesteps=1000, parameters=123)
SPEC = GenerationSpec(model="m", num_images=3, steps=20, seed=7, sampler="dpm++2m")
N = array_bytes(INFO)


def arr(fill: int) -> bytes:
    return bytes([fill]) * N


RECORD = ResumeRecord(done=(1,), running=(RunningImage(0, 5, arr(1), arr(2)),
                                          RunningImage(2, 0, arr(3))))


def test_layout_round_trip_and_header() -> None:
    data = encode(RECORD, SPEC, INFO)
    assert data[:8] == MAGIC == b"DDPMRS\x01\x00"
    (h,) = struct.unpack_from("<I", data, 8)
    head = json.loads(data[12:12 + h])
    assert head["done"] == [1] and head["running"] == [[0, 5, 1], [2, 0, 0]]
    assert head["identity"]["image_size"] == 32 and head["identity"]["seed"] == 7
    assert len(data) == 12 + h + 3 * N          # x, x̂0_prev of image 0; x of image 2
    assert data[12 + h:] == arr(1) + arr(2) + arr(3)
    assert decode(data, SPEC, INFO) == RECORD
    assert RECORD.steps_done(SPEC.steps_per_image) == 20 + 5
    assert resume_key("abc") == "ddpm:resume:abc"
    with pytest.raises(ValueError, match="bytes"):
        encode(ResumeRecord(done=(), running=(RunningImage(0, 1, b"x"),)), SPEC, INFO)


def _with_header(data: bytes, **changes: object) -> bytes:
    (h,) = struct.unpack_from("<I", data, 8)
    head = json.loads(data[12:12 + h])
    head.update(changes)
    new = json.dumps(head).encode()
    return data[:8] + struct.pack("<I", len(new)) + new + data[12 + h:]


def test_a_state_of_another_job_model_or_layout_is_refused() -> None:
    data = encode(RECORD, SPEC, INFO)
    mismatches = {
        "image_size 32, not 64": (SPEC, replace(INFO, image_size=64)),
        "in_channels 3, not 1": (SPEC, replace(INFO, in_channels=1)),
        "num_timesteps": (SPEC, replace(INFO, num_timesteps=500)),
        "model 'm', not 'n'": (SPEC, replace(INFO, name="n")),
        "seed 7, not 8": (SPEC.model_copy(update={"seed": 8}), INFO),
        "steps 20, not 21": (SPEC.model_copy(update={"steps": 21}), INFO),
        "sampler": (SPEC.model_copy(update={"sampler": "ddim"}), INFO),
        "another request": (SPEC.model_copy(update={"guidance_scale": 2.0}), INFO),
    }
    for message, (spec, info) in mismatches.items():
        with pytest.raises(ResumeStateError, match=message):
            decode(data, spec, info)
    damaged = {
        "not a resume state": b"GIF89a" + data[6:],
        "version 2": data[:6] + struct.pack("<H", 2) + data[8:],
        "unreadable": data[:12] + b"x" + data[13:],
        "says": data[:-1],
        "says ": data + b"\0",
        "malformed": _with_header(data, running=[[0, 5]]),
        "distinct": _with_header(data, done=[0]),
        "distinct ": _with_header(data, done=[3]),
        "step 20 of 20": _with_header(data, running=[[0, 20, 1], [2, 0, 0]]),
        "step -1": _with_header(data, running=[[0, -1, 1], [2, 0, 0]]),
        "malformed ": _with_header(data, done=[True]),
    }
    for message, bad in damaged.items():
        with pytest.raises(ResumeStateError, match=message.strip()):
            decode(bad, SPEC, INFO)
    with pytest.raises(ResumeStateError):
        decode(data[:5], SPEC, INFO)


@pytest.mark.parametrize(("images", "sampler", "mask"), [
    (1, "dpm++2m", False), (64, "dpm++2m", False), (10, "ddim", False), (64, "ddpm", False),
    (7, "ddim", True), (12, "dpm++2m", True)])
def test_the_bound_covers_every_state_and_is_reached(images: int, sampler: str,
                                                     mask: bool) -> None:
    """`state_bytes` is the longest state of the spec: every image running at its last
    step with x̂0_prev where its sampler may read one (dpm++2m, or RePaint's undo steps)."""
    kw = {"init_image": "sha256:" + "1" * 64, "mask": "sha256:" + "2" * 64,
          "jump_length": 2, "jump_n_sample": 3} if mask else {}
    spec = GenerationSpec(model="m", num_images=images, steps=20, seed=2**62, sampler=sampler,
                          **kw)
    prev = sampler == "dpm++2m" or mask
    last = spec.steps_per_image - 1
    worst = ResumeRecord(done=(), running=tuple(
        RunningImage(i, last, arr(0), arr(0) if prev else None) for i in range(images)))
    bound = state_bytes(spec, INFO)
    size = len(encode(worst, spec, INFO))
    assert size <= bound < size + 2 * images       # only the index digits may differ
    assert bound >= (1 + prev) * images * N
    # Fewer running at once (a worker's max_batch): the rest at most done.
    cap = max(1, images // 3)
    capped = ResumeRecord(done=tuple(range(cap, images)), running=worst.running[:cap])
    assert len(encode(capped, spec, INFO)) <= state_bytes(spec, INFO, running=cap) < bound \
        or images == 1
    # A state without x̂0_prev is smaller than the bound, never larger.
    light = ResumeRecord(done=(), running=tuple(RunningImage(i, 0, arr(0))
                                                for i in range(images)))
    assert len(encode(light, spec, INFO)) <= bound


def test_the_default_bound_holds_the_jobs_it_names() -> None:
    """The comment at RESUME_MAX_BYTES: every 32- and 64-pixel RGB job (64 images,
    dpm++2m), 256 pixels up to 10 images with dpm++2m and 21 with ddim, not 22."""
    def need(size: int, images: int, sampler: str) -> int:
        info = replace(INFO, image_size=size)
        return state_bytes(GenerationSpec(model="m", num_images=images, steps=1000,
                                          sampler=sampler), info)
    assert need(32, 64, "dpm++2m") <= need(64, 64, "dpm++2m") <= RESUME_MAX_BYTES
    assert need(256, 10, "dpm++2m") <= RESUME_MAX_BYTES < need(256, 11, "dpm++2m")
    assert need(256, 21, "ddim") <= RESUME_MAX_BYTES < need(256, 22, "ddim")
