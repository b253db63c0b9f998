"""Past one Redis (`DDPM_REDIS_MODELS`, app/shards.py), over real processes: two Redis
servers, a worker on each (`tiny` on A, the default Redis; `tinycond` on B), one API with
the mapping. Each model's jobs live on its own Redis only; what a job id addresses is read
from the Redis the id names; the listing, /v1/models, /v1/work and /readyz cover both.
Without the mapping: one shard, ids as before (a POST stays one command:
tests/app/test_lean_api.py)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from test_lean_api import advertise

from app.listing import Listing
from app.main import create_app
from app.settings import ApiSettings
from contract.queueing import job_key
from contract.redis_connect import job_id_shard, shard_tag
from ddpm.redis_server import RedisServer
from tests.conftest import WorkerProcess

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def redis_b() -> Iterator[RedisServer]:
    """A second Redis, for the models the mapping moves off the default one."""
    with RedisServer() as srv:
        yield srv


def _wait(c: httpx.Client, job_id: str, want: str = "succeeded") -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        g = c.get(f"/v1/generations/{job_id}")
        assert g.status_code == 200, g.text
        body: dict[str, Any] = g.json()
        if body["status"] == want:
            return body
        assert body["status"] in ("queued", "running"), body
        if time.monotonic() > deadline:
            pytest.fail(f"{job_id} still {body['status']}")
        time.sleep(0.1)


def test_each_models_jobs_live_on_its_own_redis_and_are_found_by_id(
        redis_url: str, r: redis.Redis, redis_b: RedisServer, models_dir: Path,
        tmp_path: Path, start_api: Callable[..., Any],
        spawn_worker: Callable[..., Any]) -> None:
    b = redis.Redis.from_url(redis_b.url)
    mapping = json.dumps({"tinycond": redis_b.url})
    env = {"DDPM_REDIS_MODELS": mapping}
    spawn_worker("--model", "tiny", env=env)                 # on A (the fixture's Redis)
    wb = WorkerProcess(redis_b.url, models_dir, tmp_path / "worker_b.log",
                       "--model", "tinycond", env=env)
    try:
        api = start_api(env)
        with httpx.Client(base_url=api.url, timeout=60) as c:
            deadline = time.monotonic() + 120
            while {m["name"] for m in c.get("/v1/models").json()["models"]} != {
                    "tiny", "tinycond"}:
                assert time.monotonic() < deadline, wb.log()[-3000:]
                time.sleep(0.2)
            ra = c.post("/v1/generations", json={"model": "tiny", "steps": 2, "seed": 1})
            rb = c.post("/v1/generations", json={"model": "tinycond", "steps": 2,
                                                 "class_label": 3, "seed": 1})
            assert ra.status_code == rb.status_code == 202, (ra.text, rb.text)
            ida, idb = ra.json()["id"], rb.json()["id"]
            assert HEX_ID.match(ida), ida                    # the default Redis: as before
            assert idb.startswith(shard_tag(redis_b.url) + "-") and HEX_ID.match(
                idb.split("-", 1)[1]), idb
            # Each job on its own Redis only.
            assert r.exists(job_key(ida)) and not b.exists(job_key(ida))
            assert b.exists(job_key(idb)) and not r.exists(job_key(idb))

            for job_id in (ida, idb):
                done = _wait(c, job_id)
                assert done["images"], done
                png = c.get(f"/v1/generations/{job_id}/images/0")
                assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
                events = c.get(f"/v1/generations/{job_id}/events").text
                assert "event: done" in events, events[-500:]
            with c.stream("GET", f"/v1/generations/{idb}/events") as s:
                assert s.status_code == 200

            # OpenAI's route takes the model's Redis too, and waits there.
            oa = c.post("/v1/images/generations", json={
                "model": "tinycond", "prompt": "3", "n": 1, "response_format": "b64_json",
                "steps": 2})
            assert oa.status_code == 200, oa.text
            assert len(b.keys("rq:job:*")) == 2 and len(r.keys("rq:job:*")) == 1

            # Cancel and DELETE by id, each on its shard.
            long = {"steps": 1000, "num_images": 4}
            ca = c.post("/v1/generations", json={"model": "tiny", **long}).json()["id"]
            cb = c.post("/v1/generations", json={"model": "tinycond", "class_label": 1,
                                                 **long}).json()["id"]
            for job_id in (ca, cb):
                assert c.delete(f"/v1/generations/{job_id}").status_code == 200
                _wait(c, job_id, "canceled")

            listed = [g["id"] for g in c.get("/v1/generations").json()["generations"]]
            assert set(listed) >= {ida, idb, ca, cb}, listed
            assert listed.index(cb) < listed.index(ca) < listed.index(idb) < listed.index(ida)

            work = c.get("/v1/work").json()["models"]
            assert set(work) >= {"tiny", "tinycond"} and work["tinycond"]["workers"] == 1
            ready = c.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["checks"]["models"] == ["tiny", "tinycond"]
            assert 'ddpm_work_workers{model="tinycond",state="live"} 1.0' in c.get(
                "/metrics").text

            for unknown in (uuid.uuid4().hex, f"r000000-{uuid.uuid4().hex}",
                            f"{shard_tag(redis_b.url)}-{uuid.uuid4().hex}",
                            f"{shard_tag(redis_b.url)}-{ida}"):
                assert c.get(f"/v1/generations/{unknown}").status_code == 404, unknown
                assert c.get(f"/v1/generations/{unknown}/images/0").status_code == 404
    finally:
        wb.stop()


def _walk(c: httpx.Client, **params: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    for _ in range(100):
        page = c.get("/v1/generations",
                     params={**params, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["generations"]) <= params["limit"]
        ids += [g["id"] for g in page["generations"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids
    pytest.fail("the listing never ended")


def test_the_listing_merges_both_redises_newest_first_in_pages(
        r: redis.Redis, redis_b: RedisServer, start_api: Callable[..., Any]) -> None:
    b = redis.Redis.from_url(redis_b.url)
    advertise(r, "tiny")
    advertise(b, "tinycond")           # (advertised unconditional: no class label)
    api = start_api({"DDPM_REDIS_MODELS": json.dumps({"tinycond": redis_b.url}),
                     "DDPM_RATE_LIMIT": "0"})
    with httpx.Client(base_url=api.url, timeout=30) as c:
        posted = []
        for i, model in enumerate(["tiny", "tinycond", "tinycond", "tiny", "tinycond",
                                   "tiny", "tiny", "tinycond", "tinycond"]):
            res = c.post("/v1/generations", json={"model": model, "steps": 2, "seed": i})
            assert res.status_code == 202, res.text
            posted.append(res.json()["id"])
        assert len(r.keys("rq:job:*")) == 4 and len(b.keys("rq:job:*")) == 5
        for limit in (1, 2, 4, 20):
            assert _walk(c, limit=limit) == posted[::-1], limit
        assert _walk(c, limit=3, status="queued") == posted[::-1]
        assert _walk(c, limit=3, status="succeeded") == []


def _app_shards(redis_url: str, **settings: Any) -> Any:
    app = create_app(ApiSettings(redis_url=redis_url, **settings))
    return app


def test_without_the_mapping_one_shard_and_ids_as_before(
        redis_url: str, r: redis.Redis) -> None:
    advertise(r, "tiny")
    for extra in ({}, {"redis_models": {"tiny": redis_url}}):  # named, on the default Redis
        with TestClient(_app_shards(redis_url, **extra)) as c:
            shards = c.app.state.shards          # type: ignore[attr-defined]
            assert len(shards.all) == 1 and isinstance(shards.listing, Listing)
            assert shards.by_model("tiny") is shards.default
            job = c.post("/v1/generations", json={"model": "tiny", "steps": 2})
            assert job.status_code == 202 and HEX_ID.match(job.json()["id"]), job.text


def test_the_mapping_is_checked_at_start(redis_url: str) -> None:
    for bad in ("{not json", '["redis://x"]', '{"tiny": "http://x:6379"}', '{"": "redis://x"}'):
        with pytest.raises(ValidationError, match="redis_models"):
            ApiSettings(redis_url=redis_url, redis_models=bad)
    ok = ApiSettings(redis_models='{"tiny": "redis://other:6379/2"}')
    assert ok.redis_models == {"tiny": "redis://other:6379/2"}


def test_a_worker_refuses_models_the_mapping_puts_on_another_redis(
        redis_url: str, redis_b: RedisServer, spawn_worker: Callable[..., Any]) -> None:
    w = spawn_worker("--model", "tiny",
                     env={"DDPM_REDIS_MODELS": json.dumps({"tiny": redis_b.url})})
    assert w.wait(timeout=120) != 0
    log = w.log()
    assert "DDPM_REDIS_MODELS" in log and "tiny on" in log, log[-2000:]


def test_a_redis_tag_is_stable_short_and_its_own() -> None:
    a, b = "redis://:pw1@redis-a:6379/0", "redis://redis-b:6379/0"
    assert shard_tag(a) == shard_tag("redis://:pw2@redis-a:6379/0")   # password masked
    assert shard_tag(a) != shard_tag(b) and re.fullmatch(r"r[0-9a-f]{6}", shard_tag(a))
    job_id = f"{shard_tag(b)}-{uuid.uuid4().hex}"
    assert job_id_shard(job_id) == shard_tag(b) and job_id_shard(uuid.uuid4().hex) == ""
