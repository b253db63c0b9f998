"""The batch worker against a real Redis, run in-process in burst mode (RQ's own test style)."""

from __future__ import annotations

import io
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client import generate_latest
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, StartedJobRegistry

from contract.events import Event, EventType
from contract.keys import JOB_FUNC, SERIALIZER, events_key, image_key, queue_name
from contract.queueing import cancel, enqueue, fetch_job
from contract.spec import GenerationSpec
from worker.loop import BatchWorker
from worker.main import build_worker
from worker.settings import WorkerSettings


def run_burst(redis_url: str, models_dir: Path, **settings: object) -> BatchWorker:
    """Run one worker until its queues are empty, restoring the test's signal handlers."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        opts = {"max_batch": 8, "progress_interval": 0.0, **settings}
        w = build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir,
                                        device="cpu", **opts))
        w.work(burst=True)
        return w
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def events(r: redis.Redis, job_id: str) -> list[Event]:
    return [Event.from_fields(f) for _, f in r.xrange(events_key(job_id))]


def image(r: redis.Redis, job_id: str, i: int) -> np.ndarray:
    data = r.get(image_key(job_id, i))
    assert data is not None, f"image {i} of {job_id} missing"
    return np.asarray(Image.open(io.BytesIO(data)))


def test_jobs_finish_with_pngs_events_and_ttls(r, redis_url, models_dir) -> None:
    spec = GenerationSpec(model="tiny", num_images=3, steps=6, seed=5, snapshot_every=2)
    job = enqueue(r, spec)
    run_burst(redis_url, models_dir)

    job = fetch_job(r, job.id)
    assert job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert result["num_images"] == 3 and result["seed"] == 5
    assert result["image_keys"] == [image_key(job.id, i) for i in range(3)]
    imgs = [image(r, job.id, i) for i in range(3)]
    assert all(im.shape == (16, 16, 3) and im.dtype == np.uint8 for im in imgs)
    assert not np.array_equal(imgs[0], imgs[1]), "images of one request must differ"

    evs = events(r, job.id)
    types = [e.type for e in evs]
    assert types[0] == EventType.STARTED and types[-1] == EventType.DONE
    assert types.count(EventType.IMAGE) == 3
    snaps = [e for e in evs if e.type == EventType.SNAPSHOT]
    assert sorted((e.data["index"], e.data["step"]) for e in snaps) == \
        [(i, s) for i in range(3) for s in (2, 4)]
    assert all(Image.open(io.BytesIO(e.image)).size == (16, 16) and e.data["format"] == "png"
               for e in snaps)
    last = [e for e in evs if e.type == EventType.PROGRESS][-1]
    assert last.data["steps_done"] == last.data["total_steps"] == 18
    assert job.meta["progress"] == 1.0

    for key in (events_key(job.id), image_key(job.id, 0)):
        assert 0 < r.ttl(key) <= 24 * 3600, f"{key} must expire"
    # RQ's registries agree: finished, nothing left started.
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert job.id in q.finished_job_registry.get_job_ids()
    assert StartedJobRegistry(queue=q).count == 0


def test_progress_is_throttled_from_the_start(r, redis_url, models_dir) -> None:
    """Progress events come at most every `progress_interval`, counted from `started` (a
    first step's progress would land in the same write): a job shorter than the interval
    sends only its last progress, which says every step is done; with no interval, every
    step sends one."""
    slow = enqueue(r, GenerationSpec(model="tiny", steps=4, seed=1))
    run_burst(redis_url, models_dir, progress_interval=3600.0)
    assert [e.type for e in events(r, slow.id)] == [
        EventType.STARTED, EventType.IMAGE, EventType.PROGRESS, EventType.DONE]
    last = [e for e in events(r, slow.id) if e.type == EventType.PROGRESS][-1]
    assert last.data["steps_done"] == last.data["total_steps"] == 4
    assert fetch_job(r, slow.id).meta["progress"] == 1.0
    every = enqueue(r, GenerationSpec(model="tiny", steps=4, seed=2))
    run_burst(redis_url, models_dir, progress_interval=0.0)
    assert [e.data["steps_done"] for e in events(r, every.id)
            if e.type == EventType.PROGRESS] == [1, 2, 3, 4]


def test_same_request_alone_and_in_a_busy_batch_gives_the_same_images(
        r, redis_url, models_dir) -> None:
    spec = GenerationSpec(model="tiny", num_images=2, steps=8, seed=11, sampler="ddpm")
    alone = enqueue(r, spec)
    run_burst(redis_url, models_dir)
    busy = [enqueue(r, GenerationSpec(model="tiny", num_images=3, steps=12, seed=s,
                                      sampler=smp))
            for s, smp in ((1, "ddim"), (2, "dpm++2m"))]
    mixed = enqueue(r, spec)
    other = enqueue(r, spec.model_copy(update={"seed": 12}))
    run_burst(redis_url, models_dir)

    for j in (alone, mixed, other, *busy):
        assert fetch_job(r, j.id).get_status() == JobStatus.FINISHED
    for i in range(2):
        a, b = image(r, alone.id, i).astype(int), image(r, mixed.id, i).astype(int)
        assert np.abs(a - b).max() <= 1
        assert np.abs(a - image(r, other.id, i).astype(int)).max() > 1


def test_bad_payloads_fail_their_job_not_the_worker(r, redis_url, models_dir) -> None:
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    too_many = q.enqueue(JOB_FUNC, kwargs={"model": "tiny", "num_images": 1000})
    wrong_func = q.enqueue("os.getcwd")
    bad_label = q.enqueue(JOB_FUNC, kwargs={"model": "tiny", "class_label": 3})
    wrong_model = q.enqueue(JOB_FUNC, kwargs={"model": "other"})
    good = enqueue(r, GenerationSpec(model="tiny", steps=3))
    run_burst(redis_url, models_dir)

    expect = {too_many.id: "num_images", wrong_func.id: "not a generation job",
              bad_label.id: "unconditional", wrong_model.id: "not served"}
    failed = FailedJobRegistry(queue=q).get_job_ids()
    for job_id, words in expect.items():
        job = Job.fetch(job_id, connection=r, serializer=SERIALIZER)
        assert job.get_status() == JobStatus.FAILED
        assert job_id in failed
        assert words in (job.latest_result().exc_string or "")
        errors = [e for e in events(r, job_id) if e.type == EventType.ERROR]
        assert len(errors) == 1 and words in errors[0].data["message"]
    assert fetch_job(r, good.id).get_status() == JobStatus.FINISHED


def test_a_model_that_fails_to_load_fails_only_its_jobs(r, redis_url, models_dir,
                                                        tmp_path) -> None:
    mixed = tmp_path / "models"
    mixed.mkdir()
    shutil.copytree(models_dir / "tiny", mixed / "tiny")  # a symlink out would be skipped
    (mixed / "broken").mkdir()
    (mixed / "broken" / "config.json").write_text("{not json")
    bad = enqueue(r, GenerationSpec(model="broken", steps=3))
    good = enqueue(r, GenerationSpec(model="tiny", steps=3))
    run_burst(redis_url, mixed)

    bad_job = fetch_job(r, bad.id)
    assert bad_job.get_status() == JobStatus.FAILED
    assert "broken" in bad_job.latest_result().exc_string
    assert "failed to load" in bad_job.latest_result().exc_string
    assert fetch_job(r, good.id).get_status() == JobStatus.FINISHED


def test_a_job_canceled_while_queued_never_runs(r, redis_url, models_dir) -> None:
    doomed = enqueue(r, GenerationSpec(model="tiny", steps=3))
    kept = enqueue(r, GenerationSpec(model="tiny", steps=3))
    cancel(r, doomed.id)
    run_burst(redis_url, models_dir)

    assert fetch_job(r, doomed.id).get_status() == JobStatus.CANCELED
    assert r.xlen(events_key(doomed.id)) == 0
    assert r.get(image_key(doomed.id, 0)) is None
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert doomed.id in CanceledJobRegistry(queue=q).get_job_ids()
    assert fetch_job(r, kept.id).get_status() == JobStatus.FINISHED


def test_priorities_and_conditional_models(r, redis_url, models_dir) -> None:
    low = enqueue(r, GenerationSpec(model="tinycond", steps=3, class_label=1, priority="low"))
    high = enqueue(r, GenerationSpec(model="tinycond", steps=3, class_label=2,
                                     guidance_scale=2.0, priority="high"))
    run_burst(redis_url, models_dir, max_batch=1)
    lo, hi = fetch_job(r, low.id), fetch_job(r, high.id)
    assert lo.get_status() == hi.get_status() == JobStatus.FINISHED
    assert hi.started_at < lo.started_at, "the high-priority queue is served first"


def test_worker_registers_with_rq_and_unregisters(r, redis_url, models_dir) -> None:
    enqueue(r, GenerationSpec(model="tiny", steps=3))
    run_burst(redis_url, models_dir)
    assert Worker.all(connection=r) == []
    assert r.keys("ddpm:workers:*") == []


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"heartbeat_interval": 0}])
def test_settings_are_bounded(bad) -> None:
    with pytest.raises(ValueError):
        WorkerSettings(**bad)


def test_metrics_count_what_the_worker_did(r, redis_url, models_dir) -> None:
    enqueue(r, GenerationSpec(model="tiny", num_images=3, steps=4))
    enqueue(r, GenerationSpec(model="tiny", steps=2, class_label=1))
    w = run_burst(redis_url, models_dir)
    text = generate_latest(w.metrics.registry).decode()

    def value(line_start: str) -> float:
        (line,) = [x for x in text.splitlines() if x.startswith(line_start)]
        return float(line.rsplit(" ", 1)[1])

    assert value('ddpm_worker_images_total{model="tiny"}') == 3
    assert value('ddpm_worker_slot_steps_total{model="tiny"}') == 12
    assert value('ddpm_worker_jobs_total{outcome="succeeded"}') == 1
    assert value('ddpm_worker_jobs_total{outcome="failed"}') == 1
    assert value('ddpm_worker_unet_forward_seconds_count{model="tiny"}') == 4
    assert value("ddpm_worker_queue_wait_seconds_count") == 2
    assert value('ddpm_worker_model_load_seconds{model="tiny"}') > 0
