"""The API/worker contract: every request field bounded, one event schema, Redis names.

`contract` is imported by the API as well as by the workers, so it must stay light
(no torch, no rq) and reject anything a worker could not run before it is enqueued.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from contract.events import Event, EventType
from contract.keys import PREFIX, events_key, image_key, queue_name, worker_key
from contract.limits import MAX_SEED
from contract.spec import GenerationSpec, ModelInfo

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------
# GenerationSpec: bounds and consistency.


def test_defaults_are_valid() -> None:
    spec = GenerationSpec(model="tiny")
    assert spec.num_images == 1
    assert spec.sampler == "dpm++2m"
    assert spec.eta == 0.0
    assert spec.snapshot_every == 0
    assert spec.class_label is None
    assert spec.guidance_scale == 1.0
    assert spec.priority == "normal"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_images", 0),
        ("num_images", 65),
        ("steps", 0),
        ("steps", 1001),
        ("eta", -0.1),
        ("eta", 1.1),
        ("seed", -1),
        ("seed", 2**63),
        ("snapshot_every", -1),
        ("snapshot_every", 1001),
        ("class_label", -1),
        ("class_label", 10_000),
        ("sampler", "euler"),
        ("snapshot_kind", "eps"),
        ("priority", "urgent"),
    ],
)
def test_out_of_range_fields_are_rejected(field: str, value: Any) -> None:
    extra: dict[str, Any] = {"sampler": "ddim"} if field == "eta" else {}
    with pytest.raises(ValidationError) as err:
        GenerationSpec(model="tiny", **{**extra, field: value})
    assert field in str(err.value)


@pytest.mark.parametrize("value", [21.0, -0.5, float("inf"), float("nan")])
def test_guidance_scale_is_bounded(value: float) -> None:
    with pytest.raises(ValidationError) as err:
        GenerationSpec(model="tiny", class_label=0, guidance_scale=value)
    assert "guidance_scale" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_images", 1), ("num_images", 64), ("steps", 1), ("steps", 1000), ("seed", 0),
     ("seed", MAX_SEED), ("snapshot_every", 1000), ("class_label", 0)],
)
def test_bounds_are_inclusive(field: str, value: int) -> None:
    assert getattr(GenerationSpec(model="tiny", **{field: value}), field) == value


@pytest.mark.parametrize("name", ["../x", "", "a b", "a" * 65, "-lead", ".hidden", "a/b",
                                  "x:y", "naïve"])
def test_bad_model_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as err:
        GenerationSpec(model=name)
    assert "model" in str(err.value)


@pytest.mark.parametrize("name", ["a", "cifar10", "celeba-hq_256.v2", "A" * 64])
def test_good_model_names_are_accepted(name: str) -> None:
    assert GenerationSpec(model=name).model == name


def test_model_is_required() -> None:
    with pytest.raises(ValidationError) as err:
        GenerationSpec()  # type: ignore[call-arg]
    assert "model" in str(err.value)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        GenerationSpec(model="tiny", cfg_scale=3.0)  # type: ignore[call-arg]
    assert "cfg_scale" in str(err.value)
    with pytest.raises(ValidationError):
        GenerationSpec.model_validate({"model": "tiny", "width": 64})


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_eta_only_with_ddim(sampler: str) -> None:
    with pytest.raises(ValidationError) as err:
        GenerationSpec(model="tiny", sampler=sampler, eta=0.5)
    assert "eta" in str(err.value)
    assert GenerationSpec(model="tiny", sampler="ddim", eta=0.5).eta == 0.5
    assert GenerationSpec(model="tiny", sampler=sampler, eta=0.0).eta == 0.0


def test_guidance_needs_class_label() -> None:
    with pytest.raises(ValidationError) as err:
        GenerationSpec(model="tiny", guidance_scale=3.0)
    assert "guidance_scale" in str(err.value)
    assert GenerationSpec(model="tiny", guidance_scale=3.0, class_label=2).guidance_scale == 3.0
    assert GenerationSpec(model="tiny", guidance_scale=1.0).class_label is None


def test_spec_is_frozen() -> None:
    spec = GenerationSpec(model="tiny")
    with pytest.raises(ValidationError):
        spec.steps = 5  # type: ignore[misc]


def test_seed_defaults_to_a_random_seed_in_range() -> None:
    seeds = {GenerationSpec(model="tiny").seed for _ in range(8)}
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert len(seeds) > 1           # 8 draws of 63 bits: equal only if the default is fixed
    assert GenerationSpec(model="tiny").seed != GenerationSpec(model="tiny").seed


def test_json_round_trip_keeps_every_field() -> None:
    spec = GenerationSpec(model="m-1", num_images=4, sampler="ddim", steps=30, eta=0.3,
                          seed=MAX_SEED, snapshot_every=5, snapshot_kind="xt", class_label=7,
                          guidance_scale=2.5, priority="high")
    data = spec.model_dump(mode="json")
    wire = json.loads(json.dumps(data))          # what RQ's json serializer would carry
    back = GenerationSpec.model_validate(wire)
    assert back == spec
    assert back.seed == MAX_SEED                 # a 63-bit int survives JSON
    # A default (random) seed is fixed by validation: the worker runs the same seed.
    dflt = GenerationSpec(model="tiny")
    assert GenerationSpec.model_validate(dflt.model_dump(mode="json")).seed == dflt.seed


# ---------------------------------------------------------------------------------------
# check_model: fields valid in themselves but not for the model.

UNCOND = ModelInfo(name="u", image_size=16, in_channels=3, num_timesteps=100)
COND = ModelInfo(name="c", image_size=16, in_channels=3, num_timesteps=1000, num_classes=10)


def test_check_model_accepts_a_fitting_spec() -> None:
    GenerationSpec(model="u", steps=100).check_model(UNCOND)
    GenerationSpec(model="c", class_label=9, guidance_scale=4.0).check_model(COND)


def test_check_model_steps_beyond_timesteps() -> None:
    with pytest.raises(ValueError, match="steps"):
        GenerationSpec(model="u", steps=101).check_model(UNCOND)


def test_check_model_label_on_unconditional_model() -> None:
    with pytest.raises(ValueError, match="class_label"):
        GenerationSpec(model="u", class_label=0).check_model(UNCOND)


@pytest.mark.parametrize("label", [10, 11, 9999])
def test_check_model_label_out_of_range(label: int) -> None:
    with pytest.raises(ValueError, match="class_label"):
        GenerationSpec(model="c", class_label=label).check_model(COND)


def test_model_info_from_dict_ignores_unknown_keys() -> None:
    d = {"name": "c", "image_size": 16, "in_channels": 3, "num_timesteps": 1000,
         "num_classes": 10, "class_names": [str(i) for i in range(10)], "future": 1}
    info = ModelInfo.from_dict(d)
    assert info.num_classes == 10
    assert info.class_names == [str(i) for i in range(10)]


# ---------------------------------------------------------------------------------------
# Events.

PNG = b"\x89PNG\r\n\x1a\n\x00\xff binary"


@pytest.mark.parametrize(
    "event",
    [
        Event(EventType.STARTED, {"worker": "w1", "queue_wait_s": 0.25}),
        Event(EventType.PROGRESS, {"steps_done": 3, "total_steps": 50}),
        Event(EventType.SNAPSHOT, {"index": 2, "step": 10, "format": "png", "size": 16},
              image=PNG),
        Event(EventType.SNAPSHOT, {"index": 0, "step": 3, "format": "jpeg", "size": 8},
              image=b"\xff\xd8\xff\xe0 jpeg"),
        Event(EventType.DONE),
        Event(EventType.ERROR, {"message": "naïve ünïcode"}),
    ],
)
def test_event_round_trip(event: Event) -> None:
    fields = event.to_fields()
    assert fields["type"] == str(event.type)
    assert ("image" in fields) == (event.image is not None) and "png" not in fields
    assert Event.from_fields(fields) == event           # as written (str keys)
    # As redis-py returns it without decode_responses: bytes keys and values.
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    back = Event.from_fields(raw)
    assert back == event
    assert back.type is event.type
    if event.image is not None:
        assert isinstance(back.image, bytes)
        assert back.image == event.image


def test_a_snapshot_written_before_frame_formats_is_read() -> None:
    """Entries an older worker wrote (the frame under "png") still read as frames."""
    raw = {b"type": b"snapshot", b"data": b'{"index":1,"step":4}', b"png": PNG}
    assert Event.from_fields(raw) == Event(EventType.SNAPSHOT, {"index": 1, "step": 4},
                                           image=PNG)


def test_event_without_data_field() -> None:
    assert Event.from_fields({b"type": b"canceled"}) == Event(EventType.CANCELED, {})


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(ValueError):
        Event.from_fields({"type": "exploded", "data": "{}"})


# ---------------------------------------------------------------------------------------
# Redis and RQ names.


def test_names_are_distinct_and_prefixed() -> None:
    names = [
        queue_name("tiny"),
        queue_name("tiny", "high"),
        queue_name("tiny", "low"),
        queue_name("other"),
        events_key("j1"),
        events_key("j2"),
        image_key("j1", 0),
        image_key("j1", 1),
        image_key("j2", 0),
        worker_key("w1"),
        worker_key("j1"),
    ]
    assert len(set(names)) == len(names)
    assert all(n.startswith(PREFIX) for n in names)
    assert PREFIX == "ddpm"
    assert queue_name("tiny") == queue_name("tiny", "normal")
    assert all(":" not in queue_name("tiny", p) for p in ("high", "normal", "low"))
    assert "tiny" in queue_name("tiny")
    assert "j1" in events_key("j1")


def test_contract_imports_no_torch_or_rq() -> None:
    code = (
        "import sys, contract\n"
        "heavy = [m for m in ('torch', 'rq') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60, cwd=ROOT)
    heavy = [m for m in proc.stdout.strip().split(",") if m]
    assert "torch" not in heavy
    assert "rq" not in heavy


def test_the_contract_counts_the_steps_the_sampler_takes() -> None:
    """The API reports progress from the contract's arithmetic (torch-free); the sampler's
    plan is what runs. A RePaint jump miscounted, or a start timestep rounded differently,
    shows here."""
    from contract.spec import GenerationSpec, start_timestep
    from models import repaint_plan
    from models import start_timestep as models_start

    ref = "sha256:" + "0" * 64
    for steps in (1, 2, 5, 9, 10, 11, 20, 33):
        for jump_length in (1, 3, 10):
            for jump_n_sample in (1, 2, 4):
                spec = GenerationSpec(model="m", steps=steps, init_image=ref, mask=ref,
                                      jump_length=jump_length, jump_n_sample=jump_n_sample)
                plan = repaint_plan(steps, 1000, jump_length, jump_n_sample)
                assert spec.steps_per_image == len(plan), (steps, jump_length, jump_n_sample)
    for T in (10, 100, 1000):
        for k in range(1, 1001):
            s = k / 1000
            assert start_timestep(s, T) == models_start(s, T), (s, T)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_frame_bytes_bounds_real_frames_of_noise(fmt: str, channels: int) -> None:
    """The budget's estimate of a frame is an upper bound on what Pillow makes of noise,
    the costliest content (x_t frames are mostly noise), at every size and quality."""
    import io

    import numpy as np
    from PIL import Image

    from contract.preview import Preview

    rng = np.random.default_rng(0)
    for size in (8, 28, 64, 128):
        for quality in (0,) if fmt == "png" else (1, 10, 50, 75, 90, 100):
            shape = (size, size, 3) if channels == 3 else (size, size)
            im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            buf = io.BytesIO()
            im.save(buf, format=fmt.upper(), **({"quality": quality} if quality else {}))
            estimate = Preview(size, fmt, quality).frame_bytes(channels)  # type: ignore[arg-type]
            assert len(buf.getvalue()) <= estimate, (size, quality)


@pytest.mark.parametrize("value", [True, False, "2", 2.5])
def test_integer_fields_take_no_other_json_type(value: object) -> None:
    """Strict (RequestModel): JSON's `true` was read as 1 (issue 30, ST201); `2.0` is an
    integer to JSON Schema and is taken as 2."""
    with pytest.raises(ValidationError):
        GenerationSpec.model_validate({"model": "m", "seed": value})
    assert GenerationSpec.model_validate({"model": "m", "seed": 2.0}).seed == 2
