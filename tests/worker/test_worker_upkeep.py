"""What the worker does around its jobs, against a real Redis: RQ's command listener stops
at once, maintenance keeps out of the info log, the gauges say what runs now, the loop
waits while the writer is behind, and a job whose input image expired fails alone."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.job import JobStatus
from rq.registry import StartedJobRegistry

from contract.events import Event, EventType
from contract.inputs import image_input
from contract.keys import SERIALIZER, events_key, input_key, queue_name
from contract.queueing import cancel, enqueue, fetch_job
from contract.spec import GenerationSpec
from ddpm.redis_server import free_port
from models import build_network, preset, save_checkpoint
from worker.loop import BatchWorker
from worker.main import build_worker
from worker.settings import WorkerSettings


def _worker(redis_url: str, models_dir: Path, **settings: object) -> BatchWorker:
    return build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir,
                                       device="cpu", **{"max_batch": 8, **settings}))


def _events(r: redis.Redis, job_id: str) -> list[Event]:
    return [Event.from_fields(f) for _, f in r.xrange(events_key(job_id))]


# -- RQ's command listener -----------------------------------------------------------------


def test_the_command_listener_stops_without_waiting_for_its_read_timeout(
        redis_url: str, models_dir: Path, wait_for: Callable[..., object]) -> None:
    """The race behind 60-second shutdowns, made deterministic: the listener thread has
    read an UNSUBSCRIBE's reply (no subscription left, so it waits for one) before it is
    stopped. RQ's listener waits 60 s at a time, and redis-py's stop() joins it."""
    w = _worker(redis_url, models_dir).rq.worker      # RQ's worker object, inside the RQ side
    w.subscribe()
    assert w.pubsub is not None and w.pubsub_thread is not None
    w.pubsub.unsubscribe()
    wait_for(lambda: not w.pubsub.subscribed, 10, "the listener to read the reply")
    stopper = threading.Thread(target=w.unsubscribe, daemon=True)
    stopper.start()
    stopper.join(timeout=10)
    assert not stopper.is_alive(), "stopping the listener waited on its read timeout"
    assert w.pubsub_thread is None


# -- maintenance and the info log ----------------------------------------------------------


def test_maintenance_stays_out_of_the_info_log_and_jobs_do_not(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable[..., bool],
        caplog: pytest.LogCaptureFixture) -> None:
    """RQ logged "cleaning group registries" at info every maintenance interval (every
    15 s in `make run`); the worker's own info lines (a job started) stay."""
    caplog.set_level(logging.DEBUG)
    job = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=1))
    burst(_worker(redis_url, models_dir))
    assert fetch_job(r, job.id).get_status() == JobStatus.FINISHED
    cleaning = [rec for rec in caplog.records if "cleaning" in rec.getMessage()]
    assert any("group registries" in rec.getMessage() for rec in cleaning), \
        "maintenance ran (at debug)"
    assert [rec.getMessage() for rec in cleaning if rec.levelno >= logging.INFO] == []
    assert any(rec.levelno == logging.INFO and f"job {job.id} started" in rec.getMessage()
               for rec in caplog.records)


# -- gauges --------------------------------------------------------------------------------


def _metric(port: int, name: str) -> float | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == name]
    return values[0] if values else None


GAUGES = ("ddpm_worker_active_slots", "ddpm_worker_waiting_images",
          "ddpm_worker_writer_pending_bytes")


def test_gauges_fall_to_zero_when_nothing_runs(
        r: redis.Redis, spawn_worker: Callable[..., object],
        wait_for: Callable[..., object]) -> None:
    """After a 16-image job the worker is idle: no active slot, no waiting image, nothing
    pending for the writer (the gauges kept the last step's 16). Same after a cancel, which
    ends a job without a step."""
    port = free_port()
    w = spawn_worker("--max-batch", "16", "--metrics-port", str(port))
    job = enqueue(r, GenerationSpec(model="tiny", num_images=16, steps=3, seed=1,
                                    snapshot_every=1))
    wait_for(lambda: fetch_job(r, job.id).get_status() == JobStatus.FINISHED, 60,
             "the 16-image job", w)
    wait_for(lambda: [_metric(port, g) for g in GAUGES] == [0, 0, 0], 10,
             "idle gauges after the job", w)

    slow = enqueue(r, GenerationSpec(model="tiny", num_images=20, steps=1000,
                                     sampler="ddpm", seed=2))
    wait_for(lambda: _metric(port, "ddpm_worker_active_slots") == 16
             and _metric(port, "ddpm_worker_waiting_images") == 4, 60,
             "16 slots running, 4 images waiting", w)
    cancel(r, slow.id)
    wait_for(lambda: [_metric(port, g) for g in GAUGES] == [0, 0, 0], 10,
             "idle gauges after the cancel", w)
    assert fetch_job(r, slow.id).get_status() == JobStatus.CANCELED


# -- the writer's back-pressure --------------------------------------------------------------


@pytest.fixture(scope="module")
def null_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`null64`: a network that costs nothing, at 64x64 RGB: steps outrun the writer."""
    root = tmp_path_factory.mktemp("null_models")
    cfg = preset("null").replace(image_size=64, in_channels=3)
    save_checkpoint(root / "null64", build_network(cfg.unet).eval(), cfg)
    return root


def test_the_loop_does_not_step_while_the_writer_is_behind(
        r: redis.Redis, redis_url: str, null_models: Path,
        burst: Callable[..., bool]) -> None:
    """With every step's frames past the writer's bound, the loop waits for the writer
    before each step instead of stepping on (the coalescing would keep a loop that steps on
    within the memory bound: only the wait itself shows it)."""
    w = _worker(redis_url, null_models, max_batch=16)
    w.writer.max_pending_bytes = 4096      # below one step's frames: behind after each
    behind_at_step: list[bool] = []
    step = w.engine.step

    def watched_step():  # type: ignore[no-untyped-def]
        behind_at_step.append(w.writer.behind)
        return step()

    w.engine.step = watched_step           # type: ignore[method-assign]
    job = enqueue(r, GenerationSpec(model="null64", num_images=16, steps=30, sampler="ddim",
                                    seed=1, snapshot_every=1, snapshot_format="png"))
    burst(w)
    assert fetch_job(r, job.id).get_status() == JobStatus.FINISHED
    assert len(behind_at_step) >= 30
    assert not any(behind_at_step), f"stepped {sum(behind_at_step)} times while behind"
    waits = w.metrics.registry.get_sample_value("ddpm_worker_writer_waits_total")
    assert waits is not None and waits > 0, "the writer was behind, and the loop waited"


# -- inputs that expired before a worker took the job ----------------------------------------


def _input_png(size: int, channels: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return image_input(buf.getvalue(), field="init_image", size=size, channels=channels).png


def test_a_job_whose_input_expired_fails_alone_and_the_worker_serves_on(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable[..., bool]) -> None:
    """img2img jobs store their input beside the job with the same TTL; one whose input
    went (expired, or deleted) before a worker took it fails naming the field, never
    retried, while the job taken with it finishes and the worker goes on to take the next
    (one slot each: max batch 2)."""
    w = _worker(redis_url, models_dir, max_batch=2)
    info = w.engine.models["tiny"].info
    png = _input_png(info.image_size, info.in_channels)
    digest = image_input(png, field="init_image", size=info.image_size,
                         channels=info.in_channels).digest
    spec = {"model": "tiny", "steps": 2, "init_image": digest, "strength": 0.5}
    gone, kept = "job-input-gone", "job-input-kept"
    for job_id in (gone, kept):
        r.set(input_key(job_id, "init_image"), png, ex=600)
    jobs = [enqueue(r, GenerationSpec(**spec, seed=1), job_id=gone),
            enqueue(r, GenerationSpec(**spec, seed=2), job_id=kept),
            enqueue(r, GenerationSpec(model="tiny", steps=2, seed=3)),
            enqueue(r, GenerationSpec(model="tiny", steps=2, seed=4))]
    r.delete(input_key(gone, "init_image"))         # before any worker took the job
    assert burst(w)
    assert [fetch_job(r, j.id).get_status() for j in jobs] == \
        [JobStatus.FAILED] + [JobStatus.FINISHED] * 3
    message = fetch_job(r, gone).latest_result().exc_string
    assert "init_image" in message and "gone" in message, message
    errors = [e for e in _events(r, gone) if e.type == EventType.ERROR]
    assert len(errors) == 1 and errors[0].data["message"] in message
    assert EventType.REQUEUED not in [e.type for e in _events(r, gone)]
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert StartedJobRegistry(queue=q).count == 0 and q.count == 0, "nothing left behind"
