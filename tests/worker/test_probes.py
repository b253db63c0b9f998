"""The worker's probes (worker/probes.py) on real `ddpm worker` processes and a real Redis:
/readyz answers 503 "loading" before the models are loaded (the start-up held, with Redis
paused, before the load), 200 once ready, 503 when a SIGTERM starts a drain or Redis stops
answering heartbeats; /healthz fails a stuck loop (judged on a real BatchWorker whose last
pass lies in the past: a real stuck step would need a timing) but not a Redis outage."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.queueing import enqueue, fetch_job
from contract.spec import GenerationSpec
from ddpm.redis_server import RedisServer, free_port
from worker.main import build_worker
from worker.probes import Health, serve_probes
from worker.settings import WorkerSettings


def get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError:
        return None


def answer(port: int, path: str, status: int) -> Callable[[], dict[str, Any] | None]:
    """A wait_for condition: the JSON body once `path` answers `status`."""
    def cond() -> dict[str, Any] | None:
        r = get(port, path)
        return r.json() if r is not None and r.status_code == status else None
    return cond


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may pause, stop and start again (the session's is shared)."""
    with RedisServer() as srv:
        yield srv


def test_readyz_says_loading_until_the_models_are_loaded(own_redis, spawn_worker,
                                                         wait_for) -> None:
    # Redis paused (SIGSTOP): the worker's start-up blocks in its first PING, before the
    # models load, for exactly as long as the test wants, with no timing.
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    port = free_port()
    try:
        w = spawn_worker("--metrics-port", str(port), "--redis-url", own_redis.url)
        body = wait_for(answer(port, "/readyz", 503), 60, "/readyz to answer while loading",
                        w)
        assert body == {"ready": False, "failed": ["models"], "models": "loading"}
        live = get(port, "/healthz")
        assert live is not None and live.status_code == 200, "loading is not being stuck"
        metrics = get(port, "/metrics")
        assert metrics is not None and metrics.status_code == 200
        assert "loaded from" not in w.log(), "the models must not be loaded yet"
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    body = wait_for(answer(port, "/readyz", 200), 60, "/readyz 200 once loaded", w)
    assert body["ready"] is True and body["failed"] == [] and body["models"] == "loaded"
    assert "loaded from" in w.log()
    text = get(port, "/metrics").text   # type: ignore[union-attr]
    assert 'ddpm_worker_model_load_seconds{model="tiny"}' in text


def test_readyz_503_once_sigterm_starts_a_drain(r, spawn_worker, wait_for) -> None:
    # Every running job finishes before exit (drain_finish_steps past its length), one slot
    # at a time: the drain lasts a long job, long enough for probes to see it.
    port = free_port()
    w = spawn_worker("--metrics-port", str(port), "--max-batch", "1",
                     env={"DDPM_DRAIN_FINISH_STEPS": "100000", "DDPM_GRACE_PERIOD": "600"})
    wait_for(answer(port, "/readyz", 200), 60, "the worker to be ready", w)
    job = enqueue(r, GenerationSpec(model="tiny", steps=1000, num_images=64, sampler="ddpm",
                                    seed=1))
    wait_for(lambda: fetch_job(r, job.id).get_status() == "started", 60, "the job to start", w)
    w.signal(signal.SIGTERM)
    body = wait_for(answer(port, "/readyz", 503), 30, "/readyz 503 while draining", w)
    assert body["failed"] == ["draining"], body
    assert get(port, "/healthz").status_code == 200     # type: ignore[union-attr]
    assert w.proc.poll() is None, "still draining: the job runs to its end"


def test_readyz_503_while_redis_is_down_and_200_when_back(own_redis, spawn_worker,
                                                         wait_for, tmp_path) -> None:
    port = free_port()
    w = spawn_worker("--metrics-port", str(port), "--redis-url", own_redis.url)
    wait_for(answer(port, "/readyz", 200), 60, "the worker to be ready", w)
    own_redis.kill()
    body = wait_for(answer(port, "/readyz", 503), 30, "/readyz 503 with Redis gone", w)
    assert body["failed"] == ["heartbeat"], body
    live = get(port, "/healthz")
    assert live is not None and live.status_code == 200, "an outage is not a stuck step"
    assert live.json()["redis"] == "not answering"
    own_redis.start()
    wait_for(answer(port, "/readyz", 200), 60, "/readyz 200 with Redis back", w)


# -- liveness on a real BatchWorker -----------------------------------------------------


@pytest.fixture
def worker(redis_url: str, models_dir: Path) -> Any:
    w = build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir, device="cpu",
                                    models=["tiny"], stuck_after=30, heartbeat_interval=5))
    return w


@pytest.fixture
def served(worker: Any) -> Iterator[tuple[Health, int]]:
    health = Health(worker.settings)
    health.attach(worker)
    port = free_port()
    server = serve_probes(worker.metrics.registry, health, port, "127.0.0.1")
    yield health, port
    server.shutdown()
    server.server_close()


def test_healthz_fails_a_loop_stuck_past_stuck_after(worker, served) -> None:
    _, port = served
    worker.upkeep.advertise()                       # a heartbeat went through: Redis answers
    assert get(port, "/healthz").status_code == 200     # type: ignore[union-attr]
    worker.last_pass = time.monotonic() - 31        # no pass for longer than stuck_after
    r = get(port, "/healthz")
    assert r is not None and r.status_code == 503
    assert "stuck" in r.json()["loop"]
    worker.last_pass = time.monotonic()             # a pass: alive again
    assert get(port, "/healthz").status_code == 200     # type: ignore[union-attr]
    assert get(port, "/health").status_code == 404      # type: ignore[union-attr]


def test_healthz_leaves_a_loop_held_by_a_redis_outage_alone(worker, served) -> None:
    health, port = served
    worker.upkeep.advertise()
    worker.upkeep.last_beat = time.monotonic() - 16  # heartbeats failing for > 3 intervals
    worker.last_pass = time.monotonic() - 31
    r = get(port, "/healthz")
    assert r is not None and r.status_code == 200, r.text
    ready, body = health.readiness()
    assert not ready and body["failed"] == ["heartbeat"]


def test_the_loop_and_the_heartbeat_record_their_times(worker, burst) -> None:
    before = worker.last_pass
    assert worker.upkeep.last_beat is None
    burst(worker)                                   # passes of the real loop, queues empty
    assert worker.last_pass > before
    assert worker.upkeep.last_beat is not None
    health = Health(worker.settings)
    health.attach(worker)
    assert health.liveness()[0]
    ready, body = health.readiness()
    assert ready, body
