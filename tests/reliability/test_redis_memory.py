"""Redis under memory pressure: a Redis with a small `maxmemory` and `noeviction` (as
docker-compose runs it, with a cap of its own) fills up under a live service.

* The API answers every write while Redis is full with a 503, `Retry-After` and the error
  body saying the job store is full (never a 500, never "unreachable"); what only reads
  (polling, streams, an idempotent replay) keeps working.
* The worker keeps its jobs and does not die; once memory frees, every job accepted before
  ends `succeeded` with all its images, and new submissions are accepted again.

Real redis-server (with `maxmemory`), `ddpm api` and `ddpm worker` processes, HTTP clients.
Each test runs its own Redis (the module overrides `redis_url`).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from test_redis_faults import read_sse
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from app import errors
from contract.redis_errors import redis_full
from ddpm.redis_server import RedisServer

MAXMEMORY = 16 * 2**20    # Redis's cap in these tests
FILLER = "test:filler"    # the key that fills Redis up
MARGIN = 512 * 1024       # how far past its cap the filler takes Redis
FULL_FOR = 6.0            # seconds Redis stays full (at least): past DDPM_EXECUTION_TTL (4 s
                          # in tests), so heartbeats the worker cannot write lapse too
PROMPT = 10.0             # the most any request may take while Redis is full
# One image a job, a frame every step: the worker writes to Redis at every step.
JOB = {"model": "tiny", "sampler": "ddim", "steps": 150, "snapshot_every": 1,
       "snapshot_kind": "xt"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    with RedisServer(maxmemory=MAXMEMORY, maxmemory_policy="noeviction") as srv:
        yield srv


@pytest.fixture
def redis_url(small_redis: RedisServer) -> str:
    """Overrides the session Redis: `r`, `spawn_worker` and `start_api` all use ours."""
    return small_redis.url


def fill(r: redis.Redis) -> int:
    """Take Redis MARGIN bytes past its `maxmemory` with FILLER; its length.

    Redis refuses a write when `used_memory` is past `maxmemory` before the command (its
    arguments, in the query buffer, count), so a big write is refused while a small one
    would still pass. SETRANGE at an offset is a small command that allocates the whole
    string: it takes Redis past the cap at once, and MARGIN keeps it there against the
    small frees of other clients (buffers)."""
    for _ in range(10):
        used, cap = memory(r)
        if cap == 0:
            pytest.fail("this Redis has no maxmemory")
        if used > cap + MARGIN // 2:
            break
        try:
            r.setrange(FILLER, int(r.strlen(FILLER)) + cap + MARGIN - used, b"x")
        except OutOfMemoryError:
            continue        # past the cap already: measure again
    else:
        pytest.fail(f"could not take Redis past its maxmemory: {memory(r)}")
    with pytest.raises(OutOfMemoryError):
        r.set(f"{FILLER}:probe", b"x")
    return int(r.strlen(FILLER))


def memory(r: redis.Redis) -> tuple[int, int]:
    info = r.info("memory")
    return int(info["used_memory"]), int(info["maxmemory"])


def png_bytes(size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(out, format="PNG")
    return out.getvalue()


# -- the handler: full vs unreachable ----------------------------------------------------


def test_a_full_redis_answers_503_saying_so(small_redis: RedisServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The errors a full Redis really raises (a command's, a Lua script's) become 503 "the
    job store is full", logged as one warning line without a traceback; other Redis
    errors keep their "unreachable" 503."""
    r = redis.Redis.from_url(small_redis.url)
    fill(r)
    caught: dict[str, Exception] = {}
    for name, call in (("command", lambda: r.set("k", "v")),
                       ("script", lambda: r.eval("return redis.call('SET', 'k', 'v')", 0))):
        try:
            call()
        except Exception as e:
            caught[name] = e
    assert set(caught) == {"command", "script"}, "the writes were not refused"
    assert isinstance(caught["command"], OutOfMemoryError), repr(caught["command"])
    assert isinstance(caught["script"], ResponseError), repr(caught["script"])
    assert all(redis_full(e) for e in caught.values())
    assert r.get("k") is None and r.exists(FILLER) and r.delete(FILLER) == 1  # reads, DEL
    r.close()

    app = FastAPI()
    errors.install(app)
    raised = {**caught, "other": ResponseError("WRONGTYPE Operation against a key"),
              "down": RedisConnectionError("Connection refused")}

    @app.get("/{name}")
    def route(name: str) -> None:
        raise raised[name]

    client = TestClient(app, raise_server_exceptions=False)
    caplog.set_level(logging.INFO, logger="ddpm.api")
    for name in raised:
        caplog.clear()
        resp = client.get(f"/{name}")
        assert resp.status_code == 503, (name, resp.text)
        assert int(resp.headers["retry-after"]) > 0, name
        err = resp.json()["error"]
        assert err["code"] == "unavailable", (name, err)
        full = name in ("command", "script")
        assert ("full" in err["message"] and "memory" in err["message"]) == full, (name, err)
        assert ("unreachable" in err["message"]) != full, (name, err)
        records = [rec for rec in caplog.records if rec.name == "ddpm.api"]
        assert len(records) == 1, (name, [rec.getMessage() for rec in records])
        assert records[0].exc_info is None, f"{name}: logged with a traceback"
        if full:
            assert records[0].levelno == logging.WARNING, (name, records[0].levelname)


# -- a live service ----------------------------------------------------------------------


def test_a_full_redis_gives_503s_and_loses_nothing(
        small_redis: RedisServer, r: redis.Redis, start_api: Callable[..., Any],
        spawn_worker: Callable[..., Any], wait_for: Callable[..., Any],
        record: Callable[..., None]) -> None:
    t_start = time.monotonic()
    api = start_api()
    worker = spawn_worker("--max-batch", "2")
    c = httpx.Client(base_url=api.url, timeout=30)
    wait_for(lambda: c.get("/readyz").json().get("checks", {}).get("workers") == 1, 90,
             "the worker to advertise", worker)

    def alive(when: str) -> None:
        assert worker.proc.poll() is None, \
            f"the worker died {when}:\n{worker.log()[-4000:]}"

    # Before: more one-image jobs than the worker's two slots, each writing a frame per
    # step, so that some run and some wait when Redis fills up.
    keys: dict[str, str] = {}       # job id -> its Idempotency-Key
    for seed in range(6):
        key = uuid.uuid4().hex
        resp = c.post("/v1/generations", json={**JOB, "seed": seed},
                      headers={"Idempotency-Key": key})
        assert resp.status_code == 202, resp.text
        keys[resp.json()["id"]] = key
    ids = list(keys)

    def status(i: str) -> str:
        return str(c.get(f"/v1/generations/{i}").json()["status"])

    wait_for(lambda: any(status(i) == "running" for i in ids), 60, "a job to run", worker)

    # Full: Redis refuses writes from now on (until the filler goes).
    filled = fill(r)
    full_at = time.monotonic()
    at_fill = {i: status(i) for i in ids}
    used, cap = memory(r)
    assert cap == MAXMEMORY and used > cap, (used, cap)

    problems: list[str] = []        # contract breaches seen while full, reported at the end
    codes: list[int] = []           # every answer to a write while full

    def refused(resp: httpx.Response, what: str, *, openai: bool = False) -> None:
        """A write while Redis is full: 503, Retry-After, the error body saying so."""
        codes.append(resp.status_code)
        if resp.status_code != 503:
            problems.append(f"{what}: {resp.status_code} {resp.text[:300]}")
            return
        if not resp.headers.get("retry-after", "").isdigit() or \
                int(resp.headers["retry-after"]) <= 0:
            problems.append(f"{what}: no Retry-After ({dict(resp.headers)})")
        err = resp.json().get("error") or {}
        if err.get("code") != "unavailable":
            problems.append(f"{what}: error code {err.get('code')!r}: {resp.text[:300]}")
        message = str(err.get("message", ""))
        if "full" not in message or "memory" not in message:
            problems.append(f"{what}{' (OpenAI)' if openai else ''}: the message does not "
                            f"say the job store is full: {message!r}")

    for seed in (100, 101, 102):
        refused(c.post("/v1/generations", json={**JOB, "seed": seed}, timeout=PROMPT),
                "POST /v1/generations")
    refused(c.post("/v1/generations", json={**JOB, "seed": 103}, timeout=PROMPT,
                   headers={"Idempotency-Key": uuid.uuid4().hex}),
            "POST /v1/generations with a new Idempotency-Key")
    refused(c.post("/v1/generations", timeout=PROMPT,
                   files={"init_image": ("in.png", png_bytes(), "image/png")},
                   data={"request": json.dumps({"model": "tiny", "steps": 20,
                                                "strength": 0.5})}),
            "POST /v1/generations (multipart, an init_image)")
    refused(c.post("/v1/images/generations", timeout=PROMPT,
                   json={"model": "tiny", "prompt": "", "n": 1, "steps": 5}),
            "POST /v1/images/generations", openai=True)
    victim = next((i for i in ids if at_fill[i] in ("queued", "running")), ids[-1])
    refused(c.delete(f"/v1/generations/{victim}", timeout=PROMPT),
            f"DELETE a {at_fill[victim]} job")

    # What only reads keeps working.
    replay = c.post("/v1/generations", json={**JOB, "seed": 0}, timeout=PROMPT,
                    headers={"Idempotency-Key": keys[ids[0]]})
    if replay.status_code != 202 or replay.json().get("id") != ids[0]:
        problems.append(f"an idempotent replay while full: {replay.status_code} "
                        f"{replay.text[:300]}")
    for i in ids:
        resp = c.get(f"/v1/generations/{i}", timeout=PROMPT)
        if resp.status_code != 200:
            problems.append(f"GET a job while full: {resp.status_code} {resp.text[:300]}")
    # Streams opened while full: accepted, then live to the job's end once memory frees
    # (the job may have no event yet: its worker cannot write them while Redis is full).
    watched = next((i for i in ids if at_fill[i] == "running"), ids[0])
    sse: dict[str, Any] = {"status": None, "events": 0, "last": None, "error": None}
    ws: dict[str, Any] = {"events": 0, "last": None, "close": None, "error": None}

    def follow_sse() -> None:
        try:
            with c.stream("GET", f"/v1/generations/{watched}/events", timeout=120) as resp:
                sse["status"] = resp.status_code
                for ev in read_sse(resp):
                    sse["events"] += 1
                    sse["last"] = ev["event"]
        except Exception as e:
            sse["error"] = repr(e)

    def follow_ws() -> None:
        url = api.url.replace("http://", "ws://") + f"/v1/generations/{watched}/ws"
        try:
            with ws_connect(url, open_timeout=PROMPT) as sock:
                while True:
                    ws["last"] = json.loads(sock.recv(timeout=120))["event"]
                    ws["events"] += 1
        except ConnectionClosed as e:
            ws["close"] = e.rcvd.code if e.rcvd else None
        except Exception as e:
            ws["error"] = repr(e)

    followers = [threading.Thread(target=follow_sse, daemon=True),
                 threading.Thread(target=follow_ws, daemon=True)]
    for t in followers:
        t.start()

    time.sleep(max(0.0, full_at + FULL_FOR - time.monotonic()))
    alive("while Redis was full")
    used, _ = memory(r)
    assert used > MAXMEMORY, "Redis was no longer full when it was freed: the 503s above " \
        "may not be about memory"
    at_free = {i: status(i) for i in ids}

    # Freed: the filler goes (DEL works at the cap); service resumes.
    assert r.delete(FILLER) == 1
    freed_at = time.monotonic()
    first_202: float | None = None
    after: list[str] = []
    for seed in (200, 201):
        deadline = time.monotonic() + 30
        while True:
            resp = c.post("/v1/generations", json={**JOB, "seed": seed}, timeout=PROMPT)
            if resp.status_code == 202:
                break
            assert resp.status_code == 503 and time.monotonic() < deadline, resp.text
            time.sleep(0.2)
        first_202 = first_202 or time.monotonic() - freed_at
        after.append(str(resp.json()["id"]))
    every = ids + after
    wait_for(lambda: all(status(i) in ("succeeded", "failed", "canceled") for i in every),
             120, "every job to end", worker)
    all_done = time.monotonic() - freed_at
    outcomes = {i: status(i) for i in every}
    alive("after Redis freed memory")
    for t in followers:
        t.join(timeout=PROMPT)
    images_ok = 0
    for i in every:
        if outcomes[i] != "succeeded":
            continue
        png = c.get(f"/v1/generations/{i}/images/0")
        if png.status_code == 200 and png.content.startswith(PNG_MAGIC):
            images_ok += 1
        else:
            problems.append(f"image 0 of {i}: {png.status_code} {png.text[:200]}")
    api_log = api.log()

    record(maxmemory=MAXMEMORY, filler_bytes=filled, jobs_accepted_before=len(ids),
           jobs_running_at_fill=sum(s == "running" for s in at_fill.values()),
           jobs_queued_at_fill=sum(s == "queued" for s in at_fill.values()),
           statuses_when_freed=sorted(at_free.values()),
           writes_refused=len(codes), status_503=codes.count(503),
           status_500=sum(s >= 500 and s != 503 for s in codes),
           full_s=round(freed_at - full_at, 2), first_202_after_free_s=round(first_202, 2),
           all_jobs_done_after_free_s=round(all_done, 2),
           jobs_succeeded=sum(s == "succeeded" for s in outcomes.values()),
           jobs_lost=sum(s != "succeeded" for s in outcomes.values()),
           images_downloadable=images_ok, worker_alive=worker.proc.poll() is None,
           sse_events=sse["events"], ws_events=ws["events"], ws_close=ws["close"],
           seconds=round(time.monotonic() - t_start, 1))

    lost = {i: s for i, s in outcomes.items() if s != "succeeded"}
    assert not lost, f"jobs lost to a full Redis: {lost}\n{worker.log()[-4000:]}"
    assert images_ok == len(every)
    assert sse["status"] == 200 and sse["error"] is None and sse["last"] == "done", sse
    assert ws["error"] is None and ws["last"] == "done" and ws["close"] == 1000, ws
    assert "Traceback" not in api_log, api_log[-4000:]
    assert "full" in api_log, "the API did not log the full Redis"
    assert not problems, "\n".join(problems)
