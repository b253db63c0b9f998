"""Typed events: one per kind, each count of steps named for what it counts, written and
read through the one stream-entry codec; old field names kept as aliases for readers; the
frame plan's one rule against the spec's frame count."""

from __future__ import annotations

import json
from typing import Any

import pytest

from contract.events import (
    KINDS,
    Canceled,
    Done,
    Error,
    Event,
    EventType,
    FinalImage,
    JobResult,
    Progress,
    Requeued,
    Snapshot,
    Started,
    decode,
    encode,
)
from contract.frame_plan import FramePlan, snapshot_steps
from contract.preview import Preview
from contract.spec import GenerationSpec

JPEG = b"\xff\xd8\xff\xe0 jpeg"
TYPED = [
    Started(worker="w1", model="m", num_images=2, steps_per_image=40, queue_wait_s=0.25),
    Progress(steps_done=3, total_steps=80, images_done=0, num_images=2, image_steps=[2, 1],
             steps_per_image=40),
    Snapshot(index=1, step=4, steps_per_image=40, kind="xt", format="jpeg", size=8,
             image=JPEG),
    Snapshot(index=0, step=8, steps_per_image=40, kind="x0", format="png", size=16,
             dropped=3, image=b"\x89PNG frame"),
    FinalImage(index=1, step=40, steps_per_image=40),
    Done.of(JobResult(model="m", num_images=2, seed=7, sampler="ddim", steps=25,
                      image_keys=["a", "b"], queue_wait_s=0.1, run_s=1.5)),
    Error(message="naïve ünïcode"),
    Canceled(message="canceled"),
    Requeued(message="out of memory"),
    Requeued(worker="w2"),
]


def as_redis_returns(fields: dict[str, str | bytes]) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


def wire(event: Any) -> dict[str, Any]:
    return json.loads(encode(event)["data"])


def test_one_typed_event_per_kind() -> None:
    assert set(KINDS) == set(EventType)
    assert {type(e).type for e in TYPED} == set(EventType)


@pytest.mark.parametrize("event", TYPED, ids=lambda e: type(e).__name__)
def test_typed_events_round_trip_through_the_one_codec(event: Any) -> None:
    fields = encode(event)
    assert fields == event.event.to_fields() == event.to_fields()
    assert fields["type"] == str(type(event).type)
    assert decode(as_redis_returns(fields)) == event
    assert Event.from_fields(fields).typed() == event
    assert ("image" in fields) == isinstance(event, Snapshot)


def test_frame_events_say_steps_per_image_and_keep_total_steps_as_its_alias() -> None:
    snap, final = wire(TYPED[2]), wire(TYPED[4])
    for data in (snap, final):
        assert data["steps_per_image"] == data["total_steps"] == 40
    assert wire(TYPED[3])["dropped"] == 3 and "dropped" not in snap, "0 is not written"


def test_progress_counts_all_images_steps_as_the_page_reads_them() -> None:
    """app/static/app.js draws progress from `steps_done` / `total_steps`; the client's
    progress bar reads `steps_done`: both are the job's steps over all its images."""
    data = wire(TYPED[1])
    assert (data["steps_done"], data["total_steps"]) == (3, 80)
    assert data["total_steps"] == data["num_images"] * data["steps_per_image"]


def test_started_keeps_steps_as_the_alias_of_steps_per_image() -> None:
    data = wire(TYPED[0])
    assert data["steps"] == data["steps_per_image"] == 40


def test_done_is_the_jobs_result_as_written_before() -> None:
    result = JobResult(model="m", num_images=2, seed=7, sampler="ddim", steps=25,
                       image_keys=["a", "b"], queue_wait_s=0.1, run_s=1.5)
    assert wire(Done.of(result)) == result.to_dict()


@pytest.mark.parametrize(("raw", "typed"), [
    # before steps_per_image: frame events named it total_steps, started named it steps
    ({b"type": b"image", b"data": b'{"index":1,"step":9,"total_steps":9}'},
     FinalImage(index=1, step=9, steps_per_image=9)),
    ({b"type": b"started", b"data": b'{"worker":"w","model":"m","num_images":1,"steps":9,'
                                    b'"queue_wait_s":0.5}'},
     Started(worker="w", model="m", num_images=1, steps_per_image=9, queue_wait_s=0.5)),
    # before frame formats: a PNG frame under "png"
    ({b"type": b"snapshot", b"data": b'{"index":1,"step":4,"total_steps":9,"kind":"xt"}',
      b"png": b"PNG"},
     Snapshot(index=1, step=4, steps_per_image=9, kind="xt", format="png", image=b"PNG")),
    ({b"type": b"progress", b"data": b'{"steps_done":3,"total_steps":50}'},
     Progress(steps_done=3, total_steps=50)),
    ({b"type": b"canceled"}, Canceled()),
])
def test_entries_written_before_are_read(raw: dict[bytes, bytes], typed: Any) -> None:
    assert decode(raw) == typed


def test_the_generic_form_still_writes_what_the_typed_one_does() -> None:
    """`Event(EventType.X, data)` stays the generic form (the API writes `canceled` so)."""
    generic = Event(EventType.CANCELED, {"message": "canceled"})
    assert generic.to_fields() == encode(Canceled(message="canceled"))
    assert generic.typed() == Canceled(message="canceled")


def test_a_kind_read_as_another_is_refused() -> None:
    with pytest.raises(ValueError):
        Started.from_event(Event(EventType.PROGRESS, {}))


# ---------------------------------------------------------------------------------------
# The frame plan.


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 50])
@pytest.mark.parametrize("every", [0, 1, 2, 3, 10, 60])
def test_the_spec_counts_the_frames_the_plan_makes(steps: int, every: int) -> None:
    spec = GenerationSpec(model="m", num_images=3, steps=steps, snapshot_every=every)
    plan = FramePlan.of(spec, 16)
    assert spec.snapshot_frames == 3 * plan.snapshots_per_image
    assert list(plan.snapshot_steps) == [s for s in range(1, steps + 1)
                                         if every and s % every == 0 and s < steps]
    assert [s for s in range(steps + 2) if plan.snapshot_at(s)] == list(plan.snapshot_steps)


def test_the_plan_counts_repaint_jumps_and_takes_the_specs_preview() -> None:
    digest = "sha256:" + "0" * 64
    spec = GenerationSpec(model="m", num_images=2, steps=20, init_image=digest, mask=digest,
                          jump_length=5, jump_n_sample=2, snapshot_every=7,
                          snapshot_kind="xt", snapshot_format="webp", snapshot_size=32)
    plan = FramePlan.of(spec, 64)
    assert plan.steps_per_image == spec.steps_per_image > 20
    assert list(plan.snapshot_steps) == list(range(7, spec.steps_per_image, 7))
    assert spec.snapshot_frames == 2 * plan.snapshots_per_image
    assert (plan.kind, plan.preview) == ("xt", spec.preview(64))
    assert plan.preview == Preview(32, "webp", plan.preview.quality)


def test_snapshot_steps_is_empty_without_snapshots() -> None:
    assert list(snapshot_steps(10, 0)) == []
    assert list(snapshot_steps(10, 10)) == []
    assert list(snapshot_steps(11, 10)) == [10]
