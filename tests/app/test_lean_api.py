"""The lean submit and stream path, against a real Redis and real HTTP: a POST is one Redis
command (the admission-and-enqueue script), the queue-depth cap holds under concurrent
submissions, the 202's queue position matches the GET's, replays do not spend the rate
limit, a newly served model is accepted at once, the job is a plain RQ job, `image` events
carry URLs unless `?images=inline`, and `ddpm api --workers 2` serves one set of metrics
(each request counted before its answer leaves).

Most tests need no worker: a worker advertisement is written to Redis so that the API
accepts the model, and the jobs stay queued.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.job import Job
from starlette.types import Message, Receive, Scope, Send
from test_api import PNG_MAGIC, ready, sse, submit
from websockets.sync.client import connect

from app.metrics import MULTIPROC_ENV, ApiMetrics, MetricsMiddleware
from contract.spec import GenerationSpec
from contract.workers import advertise_worker
from ddpm.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def advertise(r: redis.Redis, *models: str, name: str = "paused", image_size: int = 16,
              in_channels: int = 3) -> None:
    """A live worker's advertisement of `models`, as a worker writes it; nothing consumes."""
    doc = {"name": name, "draining": False,
           "models": [{"name": m, "image_size": image_size, "in_channels": in_channels,
                       "num_timesteps": 1000} for m in models]}
    advertise_worker(r, name, json.dumps(doc), 600, time.time())


class Commands:
    """Every command Redis runs while the block runs (MONITOR), from clients, not scripts."""

    def __init__(self, r: redis.Redis) -> None:
        self.r, self.seen = r, []
        self._started = threading.Event()

    def __enter__(self) -> Commands:
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        while not self._started.is_set():
            self.r.echo("monitor-start")
            self._started.wait(0.05)
        return self

    def _listen(self) -> None:
        with self.r.monitor() as m:
            for cmd in m.listen():
                if cmd["command"] == "ECHO monitor-start":
                    self._started.set()
                elif cmd["command"] == "ECHO monitor-stop":
                    return
                elif self._started.is_set() and cmd["client_type"] != "lua":
                    self.seen.append(cmd["command"].split(" ", 1)[0].upper())

    def __exit__(self, *exc: object) -> None:
        self.r.echo("monitor-stop")
        self._thread.join(timeout=30)


def test_a_post_is_one_redis_command(start_api: Callable[..., Any], r: redis.Redis) -> None:
    api = start_api()          # the default rate limit is on
    advertise(r, "tiny")
    n = 20
    with httpx.Client(base_url=api.url, timeout=30) as c:
        warm = c.post("/v1/generations", json={"model": "tiny", "steps": 2})
        assert warm.status_code == 202, warm.text      # loads the script, reads the models
        with Commands(r) as plain:
            ids = [submit(c, steps=2, seed=i)["id"] for i in range(n)]
        with Commands(r) as keyed:
            for i in range(n):
                resp = c.post("/v1/generations", json={"model": "tiny", "steps": 2},
                              headers={"Idempotency-Key": f"key-{i}"})
                assert resp.status_code == 202 and "idempotent-replayed" not in resp.headers
        with Commands(r) as polls:
            for job_id in ids:
                assert c.get(f"/v1/generations/{job_id}").json()["status"] == "queued"
    assert plain.seen == ["EVALSHA"] * n, plain.seen
    assert keyed.seen == ["EVALSHA"] * n, keyed.seen
    # A queued job's GET: its hash, then the queues ahead of it in one pipeline.
    assert len(polls.seen) <= 3 * n and polls.seen.count("HGETALL") == n, polls.seen


def test_the_depth_cap_holds_under_concurrent_posts(start_api: Callable[..., Any],
                                                    r: redis.Redis) -> None:
    api = start_api({"DDPM_MAX_QUEUE_DEPTH": "5", "DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")

    def post(i: int) -> httpx.Response:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            return c.post("/v1/generations", json={"model": "tiny", "steps": 2, "seed": i})

    with cf.ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(post, range(30)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] * 5 + [429] * 25, codes
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 429} == {"queue_full"}
    assert sum(r.llen(f"rq:queue:ddpm.tiny.{p}") for p in ("high", "normal", "low")) == 5


def test_the_202_position_counts_the_queues_ahead(client: httpx.Client,
                                                  r: redis.Redis) -> None:
    advertise(r, "tiny")
    order = ["normal", "normal", "high", "low", "normal"]
    jobs = [submit(client, steps=2, priority=p) for p in order]
    assert [j["queue_position"] for j in jobs] == [0, 1, 0, 3, 3]
    assert all(j["status"] == "queued" for j in jobs)
    now = [client.get(f"/v1/generations/{j['id']}").json()["queue_position"] for j in jobs]
    assert now == [1, 2, 0, 4, 3]


def test_replays_do_not_spend_the_rate_limit(start_api: Callable[..., Any],
                                             r: redis.Redis) -> None:
    api = start_api({"DDPM_RATE_LIMIT": "2", "DDPM_RATE_WINDOW": "86400"})
    advertise(r, "tiny")
    body = {"model": "tiny", "steps": 2}
    key = {"Idempotency-Key": "once"}
    with httpx.Client(base_url=api.url, timeout=30) as c:
        first = c.post("/v1/generations", json=body, headers=key)
        assert first.status_code == 202 and first.headers["location"].endswith(
            first.json()["id"])
        for _ in range(3):
            again = c.post("/v1/generations", json=body, headers=key)
            assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
            assert again.json()["id"] == first.json()["id"]
            assert again.json()["queue_position"] == 0
        assert c.post("/v1/generations", json=body).status_code == 202
        over = c.post("/v1/generations", json=body)
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
        # Past the limit, the replay still answers, and another body is still a 422.
        assert c.post("/v1/generations", json=body, headers=key).status_code == 202
        other = c.post("/v1/generations", json={**body, "steps": 3}, headers=key)
        assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key"
    assert sum(r.llen(f"rq:queue:ddpm.tiny.{p}") for p in ("high", "normal", "low")) == 2


def test_a_model_served_since_the_last_read_is_accepted_at_once(
        start_api: Callable[..., Any], r: redis.Redis) -> None:
    api = start_api({"DDPM_MODELS_CACHE_S": "60"})
    advertise(r, "tiny", name="one")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        assert c.post("/v1/generations", json={"model": "tiny"}).status_code == 202
        missing = c.post("/v1/generations", json={"model": "tinycond"})
        assert missing.status_code == 404 and "available: tiny" in missing.json()["error"][
            "message"]
        advertise(r, "tinycond", name="two")
        assert c.post("/v1/generations", json={"model": "tinycond"}).status_code == 202


def queued(r: redis.Redis, model: str) -> int:
    return sum(r.llen(f"rq:queue:ddpm.{model}.{p}") for p in ("high", "normal", "low"))


def frame_bytes(body: dict[str, Any], image_size: int, channels: int) -> int:
    """What the API counts a request's snapshot frames as: frames × estimated frame bytes
    at the request's preview (contract)."""
    spec = GenerationSpec(**body)
    return spec.snapshot_frames * spec.preview(image_size).frame_bytes(channels)


def test_frames_over_the_stream_budget_are_refused_before_queueing(
        start_api: Callable[..., Any], r: redis.Redis) -> None:
    """A request whose snapshot frames alone would pass the job stream's byte budget
    (DDPM_STREAM_MAX_BYTES) is a 422 naming snapshot_every, and nothing is queued; one
    frame less fits; smaller frames (the request's own preview size) fit too."""
    budget = 256 * 1024
    api = start_api({"DDPM_STREAM_MAX_BYTES": str(budget), "DDPM_RATE_LIMIT": "0"})
    advertise(r, "big", image_size=256)           # RGB: 128 px JPEG frames by default
    one = frame_bytes({"model": "big", "steps": 2, "snapshot_every": 1}, 256, 3)
    fits = budget // one                         # frames within the budget
    under = {"model": "big", "num_images": 1, "steps": fits + 1, "snapshot_every": 1,
             "snapshot_kind": "xt"}                  # a frame per step but the last
    over = {**under, "steps": fits + 2}
    assert frame_bytes(under, 256, 3) <= budget < frame_bytes(over, 256, 3)
    with httpx.Client(base_url=api.url, timeout=30) as c:
        refused = c.post("/v1/generations", json=over)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["field"] == "snapshot_every" and "MiB" in error["message"]
        assert queued(r, "big") == 0
        assert c.post("/v1/generations", json=under).status_code == 202
        assert queued(r, "big") == 1
        smaller = {**over, "snapshot_size": 64}
        assert frame_bytes(smaller, 256, 3) <= budget
        assert c.post("/v1/generations", json=smaller).status_code == 202
        # The same over-budget frames split over images: still refused.
        wide = {**under, "num_images": 2}
        assert frame_bytes(wide, 256, 3) > budget
        assert c.post("/v1/generations", json=wide).json()["error"]["field"] == \
            "snapshot_every"
        assert queued(r, "big") == 2


def test_a_snapshot_size_over_the_model_is_refused(client: httpx.Client,
                                                   r: redis.Redis) -> None:
    advertise(r, "tiny")                          # 16 px
    for size, status in ((17, 422), (1024, 422), (16, 202), (8, 202)):
        resp = client.post("/v1/generations", json={"model": "tiny", "steps": 2,
                                                     "snapshot_every": 1,
                                                     "snapshot_size": size})
        assert resp.status_code == status, (size, resp.text)
        if status == 422:
            assert resp.json()["error"]["field"] == "snapshot_size"
    assert queued(r, "tiny") == 2
    png_quality = client.post("/v1/generations", json={
        "model": "tiny", "snapshot_format": "png", "snapshot_quality": 50})
    assert png_quality.status_code == 422
    assert png_quality.json()["error"]["field"] == "snapshot_quality"


def test_the_job_is_a_plain_rq_job(start_api: Callable[..., Any], r: redis.Redis,
                                   redis_url: str) -> None:
    api = start_api({"DDPM_WEBHOOK_ALLOW_HOSTS": "hooks.example"})
    advertise(r, "tiny")
    body = {"model": "tiny", "num_images": 2, "steps": 3, "seed": 5, "priority": "high",
            "webhook": "https://hooks.example/done"}
    with httpx.Client(base_url=api.url, timeout=30) as c:
        made = c.post("/v1/generations", json=body).json()
    queue = Queue("ddpm.tiny.high", connection=r, serializer="json")
    assert queue.job_ids == [made["id"]]
    assert queue in Queue.all(connection=r)
    job = Job.fetch(made["id"], connection=r, serializer="json")
    assert job.get_status() == "queued" and job.origin == "ddpm.tiny.high"
    assert job.func_name == "worker.tasks.generate"
    assert job.kwargs == made["request"] and job.kwargs["seed"] == 5
    assert job.retries_left == 3 and job.enqueued_at is not None
    assert job.meta["owner"] and job.result_ttl == job.failure_ttl == 24 * 3600
    assert [(w.url, w.job_status) for w in job.webhooks] == [
        ("https://hooks.example/done", "finished"), ("https://hooks.example/done", "failed")]
    info = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", redis_url,
                           "ddpm.tiny.high"], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "ddpm.tiny.high" in info.stdout, info.stdout + info.stderr


# -- events ------------------------------------------------------------------------------


def test_image_events_carry_urls_and_pngs_only_when_asked(
        api: Any, client: httpx.Client, spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    job = submit(client, num_images=2, steps=4, snapshot_every=2)
    default = sse(client, job["id"])
    assert default[-1]["event"] == "done"
    root = f"/v1/generations/{job['id']}"
    images = [e["data"] for e in default if e["event"] == "image"]
    assert sorted((d["index"], d["url"]) for d in images) == [
        (i, f"{root}/images/{i}") for i in (0, 1)]
    assert all("png" not in d for d in images)
    snaps = [e["data"] for e in default if e["event"] == "snapshot"]
    # A 16-pixel model's frames are PNGs at full size by default, under `image`.
    assert snaps and all(base64.b64decode(d["image"]).startswith(PNG_MAGIC) for d in snaps)
    assert all(set(d) >= {"index", "step", "kind", "format"} and "png" not in d
               and d["format"] == "png" for d in snaps)

    inline = sse(client, job["id"], params={"images": "inline"})
    assert [e["id"] for e in inline] == [e["id"] for e in default]
    for d in (e["data"] for e in inline if e["event"] == "image"):
        assert base64.b64decode(d["png"]) == client.get(d["url"]).content
        assert d["url"] == f"{root}/images/{d['index']}"

    bad = client.get(f"{root}/events", params={"images": "bogus"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "images"

    ws_url = api.url.replace("http://", "ws://") + f"{root}/ws"
    with connect(ws_url + "?images=inline", open_timeout=10) as ws:
        messages = []
        while not messages or messages[-1]["event"] != "done":
            messages.append(json.loads(ws.recv(timeout=30)))
    assert [m["id"] for m in messages] == [e["id"] for e in inline]
    assert [m["data"] for m in messages] == [e["data"] for e in inline]
    with connect(ws_url + "?images=bogus", open_timeout=10) as ws, \
            pytest.raises(Exception) as info:
        ws.recv(timeout=10)
    assert info.value.rcvd.code == 4422


# -- several API processes ---------------------------------------------------------------


@pytest.fixture
def api_processes(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`ddpm api --workers 2`; (URL, the temp folder its metrics directory is made in)."""
    port = free_port()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm", "api", "--workers", "2", "--redis-url", redis_url,
         "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(tmp), "DDPM_RATE_LIMIT": "0",
             "DDPM_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ddpm api --workers 2 did not start:\n"
                            + (tmp_path / "api.log").read_text()[-3000:])
            time.sleep(0.1)
        yield url, tmp
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert proc.returncode == 0, (tmp_path / "api.log").read_text()[-3000:]
    assert not list(tmp.glob("ddpm-api-metrics-*")), "the metrics directory is removed"


def _posts_by_process(metrics_dir: Path) -> dict[str, float]:
    """pid → the POST /v1/generations 202s its counter file holds."""
    out = {}
    for f in metrics_dir.glob("counter_*.db"):
        total = 0.0
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(f)):
            name, _, labels, *_ = json.loads(key)
            if name == "ddpm_api_requests" and labels.get("status") == "202":
                total += value
        out[f.stem.removeprefix("counter_")] = total
    return out


def test_a_request_is_counted_before_its_answer_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cause of a flaky sum (a scrape right after the last answer missed it): the
    request counter must already hold a request when its last body message is sent, and
    count it once; one whose last message never goes (the client left) counts on return."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    metrics = ApiMetrics()

    def counted(status: str) -> float:
        return metrics.registry.get_sample_value("ddpm_api_requests_total", {
            "method": "POST", "route": "unmatched", "status": status}) or 0.0

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})

    async def left(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    seen: list[tuple[str, bool, float]] = []

    async def send(message: Message) -> None:     # what the server hands to the socket
        seen.append((message["type"], bool(message.get("more_body")), counted("201")))

    scope: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    asyncio.run(MetricsMiddleware(answer, metrics)(scope, receive, send))
    assert seen == [("http.response.start", False, 0.0), ("http.response.body", True, 0.0),
                    ("http.response.body", False, 1.0)]
    assert counted("201") == 1.0
    asyncio.run(MetricsMiddleware(left, metrics)(scope, receive, send))
    assert counted("200") == 1.0 and counted("201") == 1.0


def test_several_api_processes_add_up_their_metrics(api_processes: tuple[str, Path],
                                                    r: redis.Redis) -> None:
    url, tmp = api_processes
    advertise(r, "tiny")
    (metrics_dir,) = tmp.glob("ddpm-api-metrics-*")

    def post(i: int) -> int:
        with httpx.Client(base_url=url, timeout=30) as c:     # a connection per request
            return c.post("/v1/generations", json={"model": "tiny", "seed": i}).status_code

    sent = 0
    with cf.ThreadPoolExecutor(8) as pool:
        for _ in range(20):          # until both processes have served some
            codes = list(pool.map(post, range(sent, sent + 40)))
            assert codes == [202] * 40
            sent += 40
            by_pid = _posts_by_process(metrics_dir)
            if len(by_pid) == 2 and all(by_pid.values()):
                break
    assert len(by_pid) == 2 and all(by_pid.values()), by_pid
    text = httpx.get(f"{url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and labels.items() <= s.labels.items())

    assert value("ddpm_api_requests", "ddpm_api_requests_total", method="POST",
                 route="/v1/generations", status="202") == sent == sum(by_pid.values())
    assert value("ddpm_api_generations_created", "ddpm_api_generations_created_total",
                 model="tiny") == sent
    assert value("ddpm_api_request_seconds", "ddpm_api_request_seconds_count",
                 route="/v1/generations") == sent
    assert value("ddpm_queue_depth", "ddpm_queue_depth", queue="ddpm.tiny.normal") == sent
    assert value("ddpm_api_open_streams", "ddpm_api_open_streams") == 0
    # Read from Redis once per scrape, not once per process.
    assert len(families["ddpm_workers_live"].samples) == 1
