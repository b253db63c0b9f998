"""Scale to zero: with `DDPM_SERVE_IDLE_MODELS` the API takes a job for a model no live
worker serves now (one served it lately: its shape is remembered), stays ready without
workers, and the job waits for the next worker; without it, such a model is refused and
the API is not ready. Real `ddpm worker` and `ddpm api` processes."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import httpx
import redis

from contract.keys import KNOWN_MODELS

JOB = {"model": "tiny", "steps": 3, "seed": 5}


def test_a_model_served_lately_is_queued_at_zero_workers(
        r: redis.Redis, start_api: Callable[..., Any], spawn_worker: Callable[..., Any],
        wait_for: Callable[..., Any]) -> None:
    w = spawn_worker("--name", "first")
    wait_for(lambda: r.hexists(KNOWN_MODELS, "tiny"), 60, "the model remembered", w)
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0
    assert not r.zrange("ddpm:workers", 0, -1), "the stopped worker withdrew"

    idle = start_api(env={"DDPM_SERVE_IDLE_MODELS": "true", "DDPM_MODELS_CACHE_S": "0"})
    strict = start_api(env={"DDPM_MODELS_CACHE_S": "0"})
    with httpx.Client(base_url=idle.url, timeout=30) as c, \
            httpx.Client(base_url=strict.url, timeout=30) as s:
        # Without the setting: refused, and not ready (no live worker).
        refused = s.post("/v1/generations", json=JOB)
        assert refused.status_code == 404, refused.text
        assert "not served" in refused.json()["error"]["message"]
        assert s.get("/readyz").status_code == 503

        # With it: ready, listed with 0 workers, and the job waits in the queue.
        assert c.get("/readyz").status_code == 200
        card = c.get("/v1/models/tiny")
        assert card.status_code == 200 and card.json()["workers"] == 0
        assert "tinycond" in {m["name"] for m in c.get("/v1/models").json()["models"]}
        posted = c.post("/v1/generations", json=JOB)
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        work = c.get("/v1/work").json()["models"]["tiny"]
        assert (work["workers"], work["queued_jobs"], work["queued_image_steps"]) == (0, 1, 3)
        assert c.get(f"/v1/generations/{job_id}").json()["status"] == "queued"

        # The worker KEDA would start takes it.
        w2 = spawn_worker("--name", "second")
        wait_for(lambda: c.get(f"/v1/generations/{job_id}").json()["status"] == "succeeded",
                 60, "the queued job done by the next worker", w2)
