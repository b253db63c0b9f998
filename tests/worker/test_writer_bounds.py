"""The event writer's bounds, against a real Redis: snapshots coalesce (latest wins) while
it is behind and nothing else is dropped; a job's frames stay within the stream's byte
budget, oldest first; frames expire after the job ends; a full Redis holds the writes
until it has room again."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from contract.events import (
    Error,
    Event,
    EventType,
    FinalImage,
    Progress,
    Requeued,
    Snapshot,
    Started,
    decode,
)
from contract.frame_plan import FramePlan
from contract.keys import FRAMES_EXPIRING, events_key, frames_key, image_key
from contract.preview import Preview
from contract.spec import GenerationSpec, ModelInfo, SpecError
from worker.engine import Frame
from worker.events import Batch, EventWriter
from worker.frames import FrameExpiry, encode_frame
from worker.writes import ttl_slack

PNG16 = Preview(16, "png")


def noise(side: int, seed: int, channels: int = 3) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (side, side, channels), dtype=np.uint8))


def entries(r: redis.Redis, job: str) -> list[tuple[str, Event]]:
    return [(i.decode(), Event.from_fields(f)) for i, f in r.xrange(events_key(job))]


def step_batch(job: str, images: int, step: int, total: int, *, final: bool = False,
               side: int = 16) -> Batch:
    """What one step of a job makes: a frame per image and a progress event."""
    b = Batch()
    for i in range(images):
        b.frame(Frame(job, i, step, noise(side, step * 100 + i), final), total, "xt", PNG16)
    b.event(job, Event(EventType.PROGRESS, {"steps_done": step * images}))
    return b


def test_behind_writer_coalesces_snapshots_latest_wins_and_keeps_the_rest(
        r: redis.Redis) -> None:
    """With writes paused, a run of steps piles up: past half the pending bound, an untaken
    snapshot is replaced by the next one of its image, which counts it; finals, progress
    events and their order all survive, and pending bytes return to zero."""
    dropped: list[int] = []
    frame_bytes = 16 * 16 * 3
    w = EventWriter(r, ttl=60, maxlen=10_000, max_pending_bytes=2**20,
                    on_drop=dropped.append)
    w.max_pending_bytes = 8 * frame_bytes          # below the setting's floor, for the test
    job, images, steps = "j1", 3, 20
    r.client_pause(1500, all=False)                 # writes wait; the writer blocks on one
    try:
        w.send(step_batch(job, images, 1, steps))
        while not w._queue.empty():                 # the writer took it, and is blocked
            time.sleep(0.01)
        time.sleep(0.2)
        for s in range(2, steps):
            w.send(step_batch(job, images, s, steps))
        seq = w.send(step_batch(job, images, steps, steps, final=True))
        assert w.pending_bytes <= 8 * frame_bytes + images * frame_bytes * 2 + 4096, \
            "coalescing kept the queued frames bounded"
    finally:
        r.client_unpause()
    assert w.wait(seq, timeout=30)
    w.close()
    assert w.pending_bytes == 0
    evs = [e for _, e in entries(r, job)]
    progress = [e.data["steps_done"] for e in evs if e.type == EventType.PROGRESS]
    assert progress == [s * images for s in range(1, steps + 1)], "events kept, in order"
    finals = [e for e in evs if e.type == EventType.IMAGE]
    assert sorted(e.data["index"] for e in finals) == list(range(images))
    for i in range(images):
        assert r.get(image_key(job, i)) is not None
        snaps = [e for e in evs if e.type == EventType.SNAPSHOT and e.data["index"] == i]
        got = [e.data["step"] for e in snaps]
        assert got == sorted(got) and got[-1] == steps - 1, "the latest frame always wins"
        # every frame made is written or counted by the next written frame of its image
        assert sum(1 + e.data.get("dropped", 0) for e in snaps) == steps - 1
        last = evs.index(snaps[-1])
        assert evs.index(next(e for e in finals if e.data["index"] == i)) > last
    assert sum(dropped) > 0, "the writer was behind: something was coalesced"
    assert sum(dropped) == sum(e.data.get("dropped", 0) for e in evs
                               if e.type == EventType.SNAPSHOT)


def test_a_writer_that_keeps_up_drops_nothing(r: redis.Redis) -> None:
    w = EventWriter(r, ttl=60, maxlen=10_000)
    seq = 0
    for s in range(1, 11):
        seq = w.send(step_batch("j2", 2, s, 10, final=s == 10))
    assert w.wait(seq, timeout=30)
    w.close()
    snaps = [e for _, e in entries(r, "j2") if e.type == EventType.SNAPSHOT]
    assert len(snaps) == 2 * 9 and not any("dropped" in e.data for e in snaps)


def test_stream_keeps_its_byte_budget_trimming_oldest_snapshots_first(
        r: redis.Redis) -> None:
    """Frames past the budget delete the oldest frames, never another event; the ledger
    counts exactly the frames kept."""
    budget = 20_000
    w = EventWriter(r, ttl=60, maxlen=10_000, stream_max_bytes=budget)
    job, seq = "j3", 0
    seq = w.event(job, Event(EventType.STARTED, {}))
    for s in range(1, 31):
        seq = w.send(step_batch(job, 2, s, 31))
    assert w.wait(seq, timeout=30)
    w.close()
    kept = entries(r, job)
    snaps = [(i, e) for i, e in kept if e.type == EventType.SNAPSHOT]
    sizes = [len(e.image or b"") for _, e in snaps]
    assert 0 < sum(sizes) <= budget
    assert int(r.get(frames_key(job) + ":bytes")) == sum(sizes)
    assert [e.data["step"] for _, e in snaps][-2:] == [30, 30], "the newest frames are kept"
    oldest_kept = min(e.data["step"] for _, e in snaps)
    assert oldest_kept > 1, "the oldest were trimmed"
    assert all(e.data["step"] >= oldest_kept for _, e in snaps)
    assert [e.data["steps_done"] for _, e in kept if e.type == EventType.PROGRESS] == \
        [2 * s for s in range(1, 31)], "no other event was trimmed"
    assert kept[0][1].type == EventType.STARTED


def test_coalescing_starts_just_past_half_the_pending_bound(r: redis.Redis) -> None:
    """Pending bytes up to half the bound: every snapshot is kept; the first batch that
    takes them past half drops the untaken snapshot of its image (not only once full)."""
    dropped: list[int] = []
    n = step_batch("j9", 1, 1, 9).nbytes              # one frame and one event
    w = EventWriter(r, ttl=60, maxlen=10_000, on_drop=dropped.append)
    w.max_pending_bytes = 8 * n                        # half: 4 batches exactly
    r.client_pause(5000, all=False)                    # nothing is written meanwhile
    try:
        w.send(step_batch("j9", 1, 1, 9))
        counts = [sum(dropped)]
        deadline = time.monotonic() + 4
        while w._waiting:                              # the writer took it, and is blocked
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for s in range(2, 7):
            w.send(step_batch("j9", 1, s, 9))
            counts.append(sum(dropped))
    finally:
        r.client_unpause()
    assert counts == [0, 0, 0, 0, 1, 2], "4 batches are half the bound, the 5th is past it"
    w.close()


def test_a_frame_total_exactly_at_the_budget_is_kept_as_the_api_admits_it(
        r: redis.Redis) -> None:
    """At the stream budget's boundary the two sides agree: the API admits a request whose
    frames come to exactly the budget, and the worker keeps frames that come to exactly
    the budget (one byte less: the API refuses, the worker trims the oldest). Both count
    the frames' encoded images."""
    frames = [noise(16, s) for s in range(2)]
    total = sum(len(encode_frame(f.numpy(), PNG16)) for f in frames)

    def kept_all(budget: int) -> bool:
        job = f"jb{budget}"
        w = EventWriter(r, ttl=60, maxlen=100, stream_max_bytes=budget)
        for s, pixels in enumerate(frames, 1):
            b = Batch()
            b.frame(Frame(job, 0, s, pixels, False), 3, "xt", PNG16)
            w.send(b)
        assert w.wait(w.event(job, Event(EventType.DONE, {})), timeout=30)
        w.close()
        snaps = [e for _, e in entries(r, job) if e.type == EventType.SNAPSHOT]
        assert sum(len(e.image or b"") for e in snaps) <= budget
        return len(snaps) == len(frames)

    info = ModelInfo(name="m", image_size=16, in_channels=3, num_timesteps=100)
    spec = GenerationSpec(model="m", steps=9, snapshot_every=2, snapshot_format="png")
    need = spec.snapshot_bytes(info)
    assert need > 0

    def admitted(budget: int) -> bool:
        try:
            spec.check_stream_budget(info, budget)
        except SpecError:
            return False
        return True

    assert [kept_all(total + d) for d in (-1, 0, 1)] == \
        [admitted(need + d) for d in (-1, 0, 1)] == [False, True, True]


def test_frames_expire_after_the_job_ends_results_stay(r: redis.Redis) -> None:
    w = EventWriter(r, ttl=600, maxlen=10_000, snapshot_ttl=5)
    job = "j4"
    w.send(step_batch(job, 2, 1, 2))
    w.send(step_batch(job, 2, 2, 2, final=True))
    before = time.time()
    seq = w.event(job, Event(EventType.DONE, {"num_images": 2}))
    assert w.wait(seq, timeout=30)
    after = time.time()
    w.close()
    due = r.zscore(FRAMES_EXPIRING, job)
    assert due is not None and before + 5 <= due <= after + 5, "snapshot_ttl after the end"
    assert 0 < r.ttl(FRAMES_EXPIRING) <= 5 + 600, "the index goes when its entries are due"
    expire = FrameExpiry(r)
    assert expire(due - 1) == 0, "not due yet"
    assert any(e.type == EventType.SNAPSHOT for _, e in entries(r, job))
    assert expire(due + 1) == 1
    left = [e.type for _, e in entries(r, job)]
    assert EventType.SNAPSHOT not in left
    assert left.count(EventType.IMAGE) == 2 and left[-1] == EventType.DONE
    assert r.get(image_key(job, 0)) is not None and r.ttl(events_key(job)) > 500
    assert not r.exists(frames_key(job), frames_key(job) + ":bytes")
    assert r.zscore(FRAMES_EXPIRING, job) is None
    assert r.ttl(FRAMES_EXPIRING) > 0 or not r.exists(FRAMES_EXPIRING)


def test_frames_that_would_outlive_their_stream_are_not_scheduled(r: redis.Redis) -> None:
    """snapshot_ttl ≥ the results' TTL: the frames go with the stream; no index is kept."""
    w = EventWriter(r, ttl=60, maxlen=100, snapshot_ttl=3600)
    w.send(step_batch("j8", 1, 1, 2))
    assert w.wait(w.event("j8", Event(EventType.DONE, {})), timeout=30)
    w.close()
    assert not r.exists(FRAMES_EXPIRING)
    assert r.ttl(frames_key("j8")) > 0 and r.ttl(frames_key("j8") + ":bytes") > 0


def test_preview_formats_are_encoded_as_asked_and_finals_stay_png(r: redis.Redis) -> None:
    w = EventWriter(r, ttl=60, maxlen=100)
    b = Batch()
    for i, p in enumerate([Preview(8, "jpeg", 50), Preview(8, "webp", 80), Preview(8, "png")]):
        b.frame(Frame("j5", i, 1, noise(8, i), False), 2, "x0", p)
    b.frame(Frame("j5", 0, 2, noise(16, 9), True), 2, "x0", Preview(8, "jpeg", 50))
    assert w.wait(w.send(b), timeout=30)
    w.close()
    snaps = [e for _, e in entries(r, "j5") if e.type == EventType.SNAPSHOT]
    assert [(e.data["format"], Image.open(io.BytesIO(e.image)).format, e.data["size"])
            for e in snaps] == [("jpeg", "JPEG", 8), ("webp", "WEBP", 8), ("png", "PNG", 8)]
    final = Image.open(io.BytesIO(r.get(image_key("j5", 0))))
    assert final.format == "PNG" and np.array_equal(np.asarray(final), noise(16, 9).numpy())


@pytest.fixture
def small_redis():  # type: ignore[no-untyped-def]
    from ddpm.redis_server import RedisServer

    with RedisServer() as srv:
        yield redis.Redis.from_url(srv.url)


def test_a_full_redis_holds_the_writes_until_it_has_room(small_redis: redis.Redis) -> None:
    """Redis at maxmemory refuses the writer's script: the writes are kept (no error for
    the job, not flushed), retried, and land once memory frees."""
    r = small_redis
    r.set("filler", b"x" * 3_000_000)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 2 * 2**20)
    full: list[int] = []
    w = EventWriter(r, ttl=60, maxlen=100, on_full=lambda: full.append(1))
    b = step_batch("j6", 2, 1, 1, final=True)
    seq = w.send(b)
    deadline = time.monotonic() + 20
    while len(full) < 2:                 # refused and retried at least once
        assert time.monotonic() < deadline, "the writer never met the full Redis"
        time.sleep(0.05)
    assert not w.flushed(seq) and w.error("j6") is None
    r.delete("filler")                   # memory frees
    assert w.wait(seq, timeout=30)
    w.close()
    assert w.error("j6") is None
    assert r.get(image_key("j6", 0)) is not None and r.get(image_key("j6", 1)) is not None
    assert [e.type for _, e in entries(r, "j6")] == [EventType.IMAGE, EventType.IMAGE,
                                                     EventType.PROGRESS]


def test_closing_while_redis_is_full_gives_up_with_an_error(small_redis: redis.Redis) -> None:
    """Shutdown must not hang on a full Redis: what is held fails (RQ brings it back)."""
    r = small_redis
    r.set("filler", b"x" * 3_000_000)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 2 * 2**20)
    w = EventWriter(r, ttl=60, maxlen=100)
    seq = w.send(step_batch("j7", 1, 1, 1, final=True))
    time.sleep(0.3)
    closer = threading.Thread(target=w.close)
    closer.start()
    closer.join(timeout=20)
    assert not closer.is_alive(), "close() hung on a full Redis"
    assert w.flushed(seq) and w.error("j7") is not None


# ---------------------------------------------------------------------------------------
# Redis commands per job: one expiry per key family, merged hash writes, typed writes.


def command_calls(r: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (commands scripts ran included)."""
    return {k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in r.info("commandstats").items()}


def one_job(w: EventWriter, job: str, steps: int = 3) -> None:
    """A 1-image job as the loop writes it, each pass flushed before the next: started,
    a snapshot and progress per step, the final image, done."""
    plan = FramePlan(steps, 1, "xt", PNG16)
    seq = w.event(job, Started(worker="w", model="m", num_images=1, steps_per_image=steps))
    assert w.wait(seq, timeout=30)
    for s in range(1, steps + 1):
        b = Batch()
        b.frame(Frame(job, 0, s, noise(16, s), s == steps, plan=plan))
        b.event(job, Progress(steps_done=s, total_steps=steps, num_images=1))
        b.hset(job, f"h:{job}", "meta", f"step {s}")
        assert w.wait(w.send(b), timeout=30)
    assert w.wait(w.event(job, Event(EventType.DONE, {})), timeout=30)


def test_a_job_sets_each_key_familys_ttl_once_not_per_batch(r: redis.Redis) -> None:
    w = EventWriter(r, ttl=600, maxlen=100, snapshot_ttl=3600)
    r.config_resetstat()
    one_job(w, "t1")
    calls = command_calls(r)
    w.close()
    # the stream once; the frames' ledger and its byte counter once each
    assert calls["expire"] == 3, calls
    assert calls["xadd"] == 1 + 2 + 3 + 1 + 1, "every event and snapshot written"
    for key in (events_key("t1"), frames_key("t1"), frames_key("t1") + ":bytes"):
        assert 540 <= r.ttl(key) <= 600, key


def test_ttls_are_set_again_once_older_than_the_slack(r: redis.Redis) -> None:
    w = EventWriter(r, ttl=600, maxlen=100)
    assert w.ttls.slack == ttl_slack(600) == 60
    key = events_key("t2")
    assert w.wait(w.event("t2", Started()), timeout=30)
    r.persist(key)                            # so that a refresh shows
    assert w.wait(w.event("t2", Progress(steps_done=1)), timeout=30)
    assert r.ttl(key) == -1, "set less than the slack ago: not set again"
    w.ttls.slack = 0.05
    time.sleep(0.1)
    assert w.wait(w.event("t2", Progress(steps_done=2)), timeout=30)
    assert 0 < r.ttl(key) <= 600, "older than the slack: set again"
    w.close()


def test_a_job_that_ended_here_gets_its_ttls_set_again_when_it_runs_again(
        r: redis.Redis) -> None:
    """A re-run (RQ's retry after `requeued`, or `rq requeue` after an ending) starts
    afresh: whatever happened to its keys meanwhile, they get a TTL."""
    w = EventWriter(r, ttl=600, maxlen=100)
    key = events_key("t3")
    for ending in (Requeued(message="retry"), Error(message="failed")):
        assert w.wait(w.event("t3", Started()), timeout=30)
        assert w.wait(w.event("t3", ending), timeout=30)
        r.persist(key)
        assert w.wait(w.event("t3", Started()), timeout=30)
        assert 0 < r.ttl(key) <= 600, type(ending).__name__
    w.close()


LOST = "lost the writer's script"


def test_a_redis_that_lost_the_writers_script_gets_every_ttl_again(
        r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """Redis restarted (its data gone) or SCRIPT FLUSH: the writer cannot know which keys
    still have the TTLs it set, so it sets them all again, and says so."""
    w = EventWriter(r, ttl=600, maxlen=100)
    key = events_key("t4")
    assert w.wait(w.event("t4", Started()), timeout=30)
    r.persist(key)
    r.script_flush()
    with caplog.at_level("WARNING", logger="ddpm.worker"):
        seq = w.event("t4", Progress(steps_done=1))
        assert w.wait(seq, timeout=30) and w.error("t4") is None
    assert 0 < r.ttl(key) <= 600
    assert [e.type for _, e in entries(r, "t4")] == [EventType.STARTED, EventType.PROGRESS]
    assert any(LOST in m for m in caplog.messages), caplog.messages
    w.close()


def test_a_writers_first_write_to_a_redis_without_its_script_is_no_loss(
        r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """A fresh Redis has never had the writer's script: the first write loads it and is
    written once, with no warning and nothing it remembers reset."""
    r.script_flush()
    w = EventWriter(r, ttl=600, maxlen=100)
    w.ttls.mark({("stream", "t4b"): time.monotonic()})    # as if set by an earlier run
    with caplog.at_level("WARNING", logger="ddpm.worker"):
        assert w.wait(w.event("t4a", Started()), timeout=30) and w.error("t4a") is None
    assert not [m for m in caplog.messages if LOST in m], caplog.messages
    assert [e.type for _, e in entries(r, "t4a")] == [EventType.STARTED]
    assert 0 < r.ttl(events_key("t4a")) <= 600
    assert not w.ttls.due("stream", "t4b", time.monotonic()), "nothing to set again"
    w.close()


def test_writes_of_one_hash_field_in_one_flush_merge_to_the_last(r: redis.Redis) -> None:
    w = EventWriter(r, ttl=600, maxlen=100)
    b = Batch()
    for s in range(1, 4):
        b.event("t5", Progress(steps_done=s))
        b.hset("t5", "h:t5", "meta", f"step {s}")
    b.hset("t5", "h:t5", "other", "x")
    r.config_resetstat()
    assert w.wait(w.send(b), timeout=30)
    calls = command_calls(r)
    w.close()
    assert calls["hset"] == 1, calls
    assert r.hgetall("h:t5") == {b"meta": b"step 3", b"other": b"x"}
    assert [e.data["steps_done"] for _, e in entries(r, "t5")] == [1, 2, 3], \
        "events are never merged"


def test_frames_are_labelled_by_their_plan_as_typed_events(r: redis.Redis) -> None:
    w = EventWriter(r, ttl=600, maxlen=100)
    plan = FramePlan(7, 3, "xt", Preview(8, "png"))
    b = Batch()
    b.frame(Frame("t6", 1, 3, noise(8, 1), False, plan=plan))
    b.frame(Frame("t6", 1, 7, noise(16, 2), True, plan=plan))
    assert w.wait(w.send(b), timeout=30)
    w.close()
    snap, final = (decode(f) for _, f in r.xrange(events_key("t6")))
    assert isinstance(snap, Snapshot) and isinstance(final, FinalImage)
    assert (snap.index, snap.step, snap.steps_per_image, snap.kind, snap.format, snap.size) \
        == (1, 3, 7, "xt", "png", 8)
    assert (final.index, final.step, final.steps_per_image) == (1, 7, 7)
    with pytest.raises(ValueError):
        Batch().frame(Frame("t6", 0, 1, noise(8, 1), False))    # no plan, no labels
