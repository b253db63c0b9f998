"""Results in S3-compatible object storage (DDPM_RESULTS_URL), against a real S3 API: moto's
server over HTTP, with a real API, worker and Redis. A job's images and inputs are uploaded
and fetched from presigned URLs (httpx, the `openai` SDK, ddpm-client) with the API key
never sent to the store; Redis keeps no PNG of the job; a store that refuses writes fails
the job, saying so; a slow store holds back only the jobs it is uploading."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis as redis_lib
from PIL import Image

from app.auth import new_key
from contract.events import Event
from contract.keys import events_key
from contract.results_store import PNG_SIGNATURE
from tests.app.test_api import poll, ready
from tests.s3_moto import Gate, MotoS3, moto_s3

KEY, DIGEST = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"steps": 4, "snapshot_every": 0}


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with moto_s3() as s:
        yield s


def _env(s3: MotoS3, url: str, endpoint: str | None = None, **more: str) -> dict[str, str]:
    return {**s3.env(endpoint), "DDPM_RESULTS_URL": url, **more}


def _png(size: int = 16) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _job_values(r: redis_lib.Redis, job_id: str) -> list[bytes]:
    """Every value Redis holds under a key naming the job (strings, hashes, lists, sets,
    streams), as bytes."""
    out: list[bytes] = []
    for key in r.scan_iter(match=f"*{job_id}*", count=1000):
        kind = r.type(key).decode()
        if kind == "string":
            out.append(r.get(key) or b"")
        elif kind == "hash":
            out += list(r.hgetall(key).values())
        elif kind == "list":
            out += r.lrange(key, 0, -1)
        elif kind in ("set", "zset"):
            out += list(r.smembers(key)) if kind == "set" else r.zrange(key, 0, -1)
        elif kind == "stream":
            out += [v for _, fields in r.xrange(key) for v in fields.values()]
    return out


def _no_png(r: redis_lib.Redis, job_id: str) -> None:
    values = _job_values(r, job_id)
    assert values, f"no keys of job {job_id}"
    assert not [v[:16] for v in values if v.startswith(PNG_SIGNATURE)]


class Recorder:
    """Every request an httpx client sends (redirects included): URL and headers."""

    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> None:
        self.sent.append(request)


def test_images_and_inputs_live_in_the_store(s3: MotoS3, start_api: Callable[..., Any],
                                              spawn_worker: Callable[..., Any],
                                              r: redis_lib.Redis) -> None:
    s3.bucket("results")
    env = _env(s3, "s3://results/run1")
    spawn_worker(env=env)
    api = start_api(env={**env, "DDPM_API_KEYS": DIGEST})
    proxied = start_api(env={**env, "DDPM_API_KEYS": DIGEST, "DDPM_RESULTS_DELIVERY": "proxy"})
    seen = Recorder()
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=30,
                      event_hooks={"request": [seen]}) as c:
        ready(c)
        body = {"model": "tiny", "num_images": 2, "seed": 3, **FAST,
                "init_image": base64.b64encode(_png()).decode(), "strength": 0.5}
        job = c.post("/v1/generations", json=body).json()
        doc = poll(c, job["id"], {"succeeded", "failed"})
        assert doc["status"] == "succeeded", doc
        objects = s3.objects("results")
        names = {f"run1/{job['id']}/images/0.png", f"run1/{job['id']}/images/1.png",
                 f"run1/{job['id']}/inputs/init_image.png"}
        assert names <= set(objects)
        assert all(objects[n].startswith(PNG_SIGNATURE) for n in names)

        # The image endpoint: a 307 to a presigned URL of the store's, followed by httpx
        # without the API key (a cross-origin redirect).
        first = c.get(f"/v1/generations/{job['id']}/images/0")
        assert first.status_code == 307
        location = first.headers["location"]
        assert location.startswith(f"{s3.endpoint}/results/run1/{job['id']}/images/0.png?")
        seen.sent.clear()
        got = c.get(f"/v1/generations/{job['id']}/images/0", follow_redirects=True)
        assert got.status_code == 200
        assert got.content == objects[f"run1/{job['id']}/images/0.png"]
        store_requests = [q for q in seen.sent if str(q.url).startswith(s3.endpoint)]
        assert len(store_requests) == 1
        assert "authorization" not in store_requests[0].headers
        # A plain GET of the presigned URL, no key at all.
        assert httpx.get(location, timeout=10).content == got.content
        # The input the model saw, the same way.
        inp = c.get(f"/v1/generations/{job['id']}/inputs/init_image", follow_redirects=True)
        assert inp.content == objects[f"run1/{job['id']}/inputs/init_image.png"]
        # What the API builds from stored images still works: grid, inline stream images.
        assert c.get(f"/v1/generations/{job['id']}/grid.png").status_code == 200
        with c.stream("GET", f"/v1/generations/{job['id']}/events",
                      params={"images": "inline"}) as s:
            text = s.read().decode()
        inline = base64.b64encode(objects[f"run1/{job['id']}/images/1.png"]).decode()
        assert inline in text
    # proxy delivery: the API streams the object itself.
    streamed = httpx.get(f"{proxied.url}/v1/generations/{job['id']}/images/1", headers=AUTH)
    assert streamed.status_code == 200
    assert streamed.content == objects[f"run1/{job['id']}/images/1.png"]

    # ddpm-client follows the redirects.
    from ddpm_client import Client

    with Client(api.url, KEY) as dc:
        assert dc.images(job["id"]) == [objects[f"run1/{job['id']}/images/{i}.png"]
                                        for i in range(2)]

    # The openai SDK: `url` answers are presigned URLs of the store's.
    oa = openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    linked = oa.images.generate(model="tiny", prompt="", n=2, response_format="url",
                                extra_body={"steps": 4, "seed": 5})
    urls = [d.url or "" for d in linked.data or []]
    assert len(urls) == 2 and all(u.startswith(f"{s3.endpoint}/results/run1/") for u in urls)
    pngs = [httpx.get(u, timeout=10) for u in urls]
    assert all(p.status_code == 200 and p.content.startswith(PNG_SIGNATURE) for p in pngs)
    b64 = oa.images.generate(model="tiny", prompt="", n=2, extra_body={"steps": 4, "seed": 5})
    assert [base64.b64decode(d.b64_json or "") for d in b64.data or []] == [
        p.content for p in pngs]                      # same seed: the same images

    # Redis keeps no PNG of these jobs: images and inputs are URLs of objects.
    for job_id in [job["id"]] + [u.split("/run1/")[1].split("/")[0] for u in urls]:
        _no_png(r, job_id)


def test_a_store_that_refuses_writes_fails_the_job(s3: MotoS3,
                                                   start_api: Callable[..., Any],
                                                   spawn_worker: Callable[..., Any],
                                                   r: redis_lib.Redis) -> None:
    env = _env(s3, "s3://missing-bucket/x")          # never created: every PUT refused
    worker = spawn_worker(env={**env, "DDPM_RESULTS_RETRY_S": "1"})
    api = start_api(env={**env, "DDPM_JOB_RETRIES": "0"})
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ready(c)
        job = c.post("/v1/generations", json={"model": "tiny", **FAST}).json()
        doc = poll(c, job["id"], {"succeeded", "failed"})
        assert doc["status"] == "failed", worker.log()[-3000:]
        assert "result store unavailable" in (doc["error"] or ""), doc
        events = [Event.from_fields(f) for _, f in r.xrange(events_key(job["id"]))]
        assert "image" not in [str(e.type) for e in events]      # never announced
        assert c.get(f"/v1/generations/{job['id']}/images/0").status_code == 404


def test_a_slow_store_holds_back_only_its_jobs(s3: MotoS3, start_api: Callable[..., Any],
                                               spawn_worker: Callable[..., Any],
                                               r: redis_lib.Redis,
                                               wait_for: Callable[..., Any]) -> None:
    s3.bucket("slow")
    gate = Gate(int(s3.endpoint.rsplit(":", 1)[1]))       # the worker uploads through it
    try:
        worker = spawn_worker(env=_env(s3, "s3://slow", gate.endpoint))
        api = start_api(env=_env(s3, "s3://slow"))
        with httpx.Client(base_url=api.url, timeout=30) as c:
            ready(c)
            a = c.post("/v1/generations", json={"model": "tiny", **FAST}).json()["id"]
            wait_for(lambda: gate.held >= 1, 60, "job A's upload to reach the store", worker)
            b = c.post("/v1/generations",
                       json={"model": "tiny", "steps": 1000, "snapshot_every": 0}).json()["id"]

            def progress(job_id: str) -> list[int]:
                return [int(e.data["steps_done"]) for e in
                        (Event.from_fields(f) for _, f in r.xrange(events_key(job_id)))
                        if str(e.type) == "progress"]

            # B steps on, its progress written, while A's upload is held ...
            wait_for(lambda: len(set(progress(b))) >= 3, 60, "job B's progress", worker)
            assert gate.held >= 1
            kinds = [str(Event.from_fields(f).type) for _, f in r.xrange(events_key(a))]
            assert "image" not in kinds and "done" not in kinds      # ... and A waits for it
            assert c.get(f"/v1/generations/{a}").json()["status"] == "running"
            gate.open()
            doc = poll(c, a, {"succeeded", "failed"})
            assert doc["status"] == "succeeded", doc
            got = c.get(f"/v1/generations/{a}/images/0", follow_redirects=True)
            assert got.content.startswith(PNG_SIGNATURE)
            c.delete(f"/v1/generations/{b}")
    finally:
        gate.close()

