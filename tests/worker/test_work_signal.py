"""The work signal with real processes (`ddpm worker`, `ddpm api`): a running job's
image-steps count until it ends, queued ones count as queued, the rate is measured by the
worker, a drained job goes back with what it has left, and the gauges say the same."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from contract.events import Event, EventType
from contract.keys import cost_key, events_key
from contract.queueing import cancel, enqueue
from contract.spec import GenerationSpec
from contract.work import read_work


def signal_of(client: httpx.Client, model: str = "tiny") -> dict[str, Any]:
    resp = client.get("/v1/work")
    assert resp.status_code == 200, resp.text
    return resp.json()["models"].get(model, {})


def post(client: httpx.Client, **body: Any) -> str:
    resp = client.post("/v1/generations", json={"model": "tiny", **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def generation(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/generations/{job_id}").json())


def gauges(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("ddpm_work_")}


def test_a_running_job_counts_until_it_ends(client: httpx.Client, r: redis.Redis,
                                            spawn_worker: Callable[..., Any],
                                            wait_for: Callable[..., Any]) -> None:
    """The issue's case: one job of 16 images × 1000 steps running, nothing queued."""
    w = spawn_worker("--name", "signal", "--max-batch", "16")
    wait_for(lambda: signal_of(client).get("workers_ready") == 1, 60, "a ready worker", w)
    long = post(client, num_images=16, steps=1000, seed=1)
    wait_for(lambda: generation(client, long)["progress"]["steps_done"] >= 16 * 5, 60,
             "the long job 5 steps in", w)
    wait_for(lambda: signal_of(client)["running_image_steps"] > 0, 10,
             "its work advertised", w)
    seen = signal_of(client)
    done = generation(client, long)["progress"]["steps_done"]       # read after the signal
    assert 0 < done < 16_000
    assert (seen["queued_jobs"], seen["queued_image_steps"]) == (0, 0)
    assert 16_000 - done <= seen["running_image_steps"] <= 16_000, (seen, done)
    assert seen["remaining_image_steps"] == seen["running_image_steps"]
    assert (seen["workers"], seen["workers_ready"]) == (1, 1)
    assert seen["model_load_s"] is not None and seen["model_load_s"] > 0

    # Its 16 slots are full: a second job waits in the queue, counted there.
    small = post(client, num_images=2, steps=5, seed=2)
    seen = signal_of(client)
    assert (seen["queued_jobs"], seen["queued_image_steps"]) == (1, 10)
    assert seen["remaining_image_steps"] == 10 + seen["running_image_steps"]

    # The rate is the worker's own measure.
    wait_for(lambda: (signal_of(client)["image_steps_per_s"] or 0) > 0, 30,
             "a measured rate", w)
    seen = signal_of(client)
    assert seen["seconds_of_work"] == pytest.approx(
        seen["remaining_image_steps"] / seen["image_steps_per_s"], rel=1e-3)
    g = gauges(client)
    tiny = (("model", "tiny"),)
    assert g[("ddpm_work_queued_image_steps", tiny)] == 10
    assert g[("ddpm_work_running_image_steps", tiny)] > 0
    assert g[("ddpm_work_image_steps_per_second", tiny)] > 0
    assert g[("ddpm_work_seconds", tiny)] > 0
    assert g[("ddpm_work_workers", (("model", "tiny"), ("state", "live")))] == 1
    assert g[("ddpm_work_workers", (("model", "tiny"), ("state", "ready")))] == 1

    # Canceled, the long job's work goes; the small one runs and ends: nothing is left.
    assert client.delete(f"/v1/generations/{long}").status_code == 200
    wait_for(lambda: generation(client, small)["status"] == "succeeded", 60,
             "the small job done", w)
    wait_for(lambda: signal_of(client)["remaining_image_steps"] == 0, 10,
             "no work left", w)
    assert signal_of(client)["queued_jobs"] == 0
    wait_for(lambda: not r.exists(cost_key(long)), 10, "the canceled job's cost deleted", w)
    assert not r.exists(cost_key(small)), "a finished job's cost is deleted"


def test_a_drained_job_is_queued_with_what_it_has_left(r: redis.Redis,
                                                       spawn_worker: Callable[..., Any],
                                                       wait_for: Callable[..., Any]) -> None:
    spec = GenerationSpec(model="tiny", num_images=4, steps=1000, seed=3)
    job = enqueue(r, spec)
    assert read_work(r, time.time())["tiny"].queued_image_steps == spec.total_steps
    w = spawn_worker("--name", "drained",
                     env={"DDPM_GRACE_PERIOD": "60", "DDPM_DRAIN_FINISH_STEPS": "0"})
    wait_for(lambda: _progress(r, job.id) >= 4 * 20, 60, "the job 20 steps in", w)
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()[-3000:]
    requeued = [e for e in _events(r, job.id) if e.type == EventType.REQUEUED]
    assert len(requeued) == 1 and requeued[0].data.get("saved_at"), requeued
    saved = int(requeued[0].data["saved_at"])
    assert 0 < saved < spec.total_steps
    work = read_work(r, time.time())["tiny"]
    assert (work.queued_jobs, work.queued_image_steps) == (1, spec.total_steps - saved)
    # No worker is live now: the rate the worker measured is still known.
    assert work.workers == 0 and work.running_image_steps == 0
    assert work.image_steps_per_s is not None and work.image_steps_per_s > 0


def test_a_taken_job_is_advertised_before_the_next_heartbeat(
        r: redis.Redis, spawn_worker: Callable[..., Any], wait_for: Callable[..., Any]) -> None:
    """A job taken leaves its queue at once: the worker advertises its work soon after,
    not at its next heartbeat (60 s here: none comes within the test)."""
    w = spawn_worker("--name", "slow-beat", env={"DDPM_HEARTBEAT_INTERVAL": "60",
                                                  "DDPM_EXECUTION_TTL": "300"})
    wait_for(lambda: read_work(r, time.time()).get("tiny"), 60, "the worker advertised", w)
    spec = GenerationSpec(model="tiny", num_images=4, steps=1000, seed=4)
    job = enqueue(r, spec)
    wait_for(lambda: read_work(r, time.time())["tiny"].running_image_steps > 0, 30,
             "the taken job's work advertised", w)
    work = read_work(r, time.time())["tiny"]
    assert work.queued_jobs == 0
    assert 0 < work.running_image_steps <= spec.total_steps
    cancel(r, job.id)


def test_a_failed_job_leaves_no_cost(r: redis.Redis, spawn_worker: Callable[..., Any],
                                     wait_for: Callable[..., Any]) -> None:
    """A job that fails for good (here: a class the model does not have) is no longer
    work; its cost goes with its `error`."""
    job = enqueue(r, GenerationSpec(model="tinycond", class_label=50, steps=5), retries=0)
    assert r.exists(cost_key(job.id))
    w = spawn_worker("--name", "refuser")
    wait_for(lambda: any(e.type == EventType.ERROR for e in _events(r, job.id)), 60,
             "the job's error", w)
    wait_for(lambda: not r.exists(cost_key(job.id)), 10, "its cost deleted", w)


def test_the_signal_needs_no_key_as_metrics(start_api: Callable[..., Any],
                                            r: redis.Redis) -> None:
    """KEDA's metrics-api scaler reads it without a key, as Prometheus reads /metrics."""
    from app.auth import new_key

    enqueue(r, GenerationSpec(model="tiny", num_images=2, steps=10))
    api = start_api(env={"DDPM_API_KEYS": new_key()[1]})
    with httpx.Client(base_url=api.url, timeout=30) as c:
        assert c.get("/v1/models").status_code == 401
        resp = c.get("/v1/work")
        assert resp.status_code == 200, resp.text
        assert resp.json()["models"]["tiny"]["queued_image_steps"] == 20


def test_the_rate_is_that_of_the_fullest_occupancy_measured() -> None:
    """At low load a worker clears fewer image-steps per second than it can: the rate
    reported is the fullest bucket's once it has MIN_STEPS steps; a pause is no work."""
    from worker.throughput import MIN_STEPS, _Buckets

    b = _Buckets()
    assert b.rate() is None
    for _ in range(10):
        b.add(2, 0.010)                  # 200 image-steps/s at 2 slots
    assert b.rate() == pytest.approx(200)
    for _ in range(MIN_STEPS - 1):
        b.add(16, 0.020)                 # 800/s at 16 slots, not yet enough steps
    assert b.rate() == pytest.approx(200)
    b.add(16, 0.020)
    assert b.rate() == pytest.approx(800)
    b.add(16, 60.0)                      # a minute without a step: Redis away, say
    assert b.rate() == pytest.approx(800)


def _events(r: redis.Redis, job_id: str) -> list[Event]:
    return [Event.from_fields(f) for _, f in r.xrange(events_key(job_id))]


def _progress(r: redis.Redis, job_id: str) -> int:
    done = [e.data["steps_done"] for e in _events(r, job_id) if e.type == EventType.PROGRESS]
    return int(done[-1]) if done else 0
