"""Redis faults: Redis restarts (AOF persistence on, as docker-compose runs it) under a live
service. Real redis-server, `ddpm api` and `ddpm worker` processes, HTTP clients.

* Jobs waiting in the queues survive a restart and are then run.
* While Redis is down the API answers every Redis-backed route promptly with a 503 and the
  JSON error body (never a 500, never a hang), `/healthz` stays 200, and open event streams
  end cleanly; once Redis is back the API and the workers carry on without a restart and
  every job submitted before, during (retried after its 503) or after the outage succeeds.

Each test runs its own Redis (the module overrides `redis_url`), so stopping it disturbs
no other test.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.exceptions import RedisError
from rq.job import JobStatus
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from contract.queueing import enqueue, fetch_job
from contract.spec import GenerationSpec
from ddpm.redis_server import RedisServer
from worker.main import build_worker
from worker.settings import WorkerSettings

DOWN_FOR = 4.0            # seconds Redis stays down
PROMPT = 10.0             # the most any request may take while Redis is down
JOB = {"model": "tiny", "sampler": "ddim", "steps": 100}


@pytest.fixture
def aof_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """This test's own Redis with an append-only file. `appendfsync always` unless the test
    asks for another (indirect parametrization): even a SIGKILL then loses no write that
    was acknowledged, such as a job a client got a 202 for."""
    fsync = getattr(request, "param", "always")
    with RedisServer(appendonly=True, appendfsync=fsync) as srv:
        yield srv


@pytest.fixture
def redis_url(aof_redis: RedisServer) -> str:
    """Overrides the session Redis: `r`, `spawn_worker` and `start_api` all use ours."""
    return aof_redis.url


# -- queued jobs -------------------------------------------------------------------------


@pytest.mark.parametrize("aof_redis", ["everysec"], indirect=True)   # compose's default
def test_queued_jobs_survive_a_redis_restart(aof_redis: RedisServer, r: redis.Redis,
                                             spawn_worker: Callable[..., Any],
                                             wait_for: Callable[..., Any],
                                             record: Callable[..., None]) -> None:
    # Control: without persistence the same restart empties Redis, so the check below is
    # about the AOF, not about a restart that did not happen.
    with RedisServer() as volatile:
        scratch = redis.Redis.from_url(volatile.url)
        enqueue(scratch, GenerationSpec(model="tiny", steps=5, seed=0))
        volatile.restart(down_for=0.2)
        assert scratch.dbsize() == 0, "a Redis without persistence kept its data?"
        scratch.close()

    t0 = time.monotonic()
    jobs = [enqueue(r, GenerationSpec(model="tiny", steps=10, seed=s, priority=prio))
            for s, prio in enumerate(["normal"] * 4 + ["high", "low"])]
    # SIGTERM, as `docker compose restart redis` sends: Redis flushes its AOF and exits.
    aof_redis.restart(down_for=1.0)
    statuses = [fetch_job(r, j.id).get_status() for j in jobs]
    assert statuses == [JobStatus.QUEUED] * len(jobs), statuses
    w = spawn_worker("--max-batch", "4")
    wait_for(lambda: all(fetch_job(r, j.id).get_status() == JobStatus.FINISHED
                         for j in jobs), 120, "every queued job to finish", w)
    succeeded = sum(fetch_job(r, j.id).get_status() == JobStatus.FINISHED for j in jobs)
    record(jobs_submitted=len(jobs), jobs_survived_restart=len(jobs), jobs_succeeded=succeeded,
           jobs_lost=len(jobs) - succeeded, seconds=round(time.monotonic() - t0, 1))


def test_a_job_taken_as_redis_goes_is_put_back(aof_redis: RedisServer, r: redis.Redis,
                                               models_dir: Path,
                                               burst: Callable[[Any], bool]) -> None:
    """The instant between popping a job and marking it started: the job is then in no
    queue and no registry, so only the worker that holds it can keep it from being lost."""
    w = build_worker(WorkerSettings(redis_url=aof_redis.url, models_dir=models_dir,
                                    device="cpu", max_batch=4))
    first, second = (enqueue(r, GenerationSpec(model="tiny", steps=5, seed=s)) for s in (1, 2))
    taken, _ = w.rq.take(1)
    assert taken == [first.id]
    aof_redis.kill(signal.SIGKILL)
    with pytest.raises(RedisError):
        w.admission.start(taken)             # what admit does next, with Redis gone
    aof_redis.start()
    burst(w)
    assert [fetch_job(r, j.id).get_status() for j in (first, second)] == \
        [JobStatus.FINISHED] * 2
    assert fetch_job(r, first.id).started_at < fetch_job(r, second.id).started_at, \
        "the job put back goes first, where it was"


# -- an outage during a run --------------------------------------------------------------


@dataclass
class Seen:
    """What the clients saw: every response, by when it was asked."""

    outage: tuple[float, float] = (float("inf"), float("inf"))   # Redis down .. up again
    calls: list[tuple[str, float, float, int]] = field(default_factory=list)  # what, t, s, code
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, t0: float, status: int) -> None:
        with self.lock:
            self.calls.append((what, t0, time.monotonic() - t0, status))

    def during(self) -> list[tuple[str, float, float, int]]:
        """Requests made entirely while Redis was down."""
        down, up = self.outage
        return [c for c in self.calls if c[1] >= down and c[1] + c[2] <= up]


def check_unavailable(resp: httpx.Response, what: str) -> None:
    """The answer a client gets while Redis is down: 503, the error body, Retry-After."""
    assert resp.status_code == 503, (what, resp.status_code, resp.text)
    err = resp.json()["error"]
    assert err["code"] == "unavailable" and err["message"], (what, resp.text)
    assert int(resp.headers["retry-after"]) > 0, what


def test_redis_outage_during_a_run(aof_redis: RedisServer, start_api: Callable[..., Any],
                                   spawn_worker: Callable[..., Any],
                                   wait_for: Callable[..., Any],
                                   record: Callable[..., None]) -> None:
    t_start = time.monotonic()
    api = start_api()
    workers = [spawn_worker("--max-batch", "2") for _ in range(2)]
    c = httpx.Client(base_url=api.url, timeout=30)
    seen = Seen()
    wait_for(lambda: c.get("/readyz").json().get("checks", {}).get("workers") == 2, 90,
             "both workers to advertise", workers[0])

    refused: list[int] = []       # seeds of submissions answered 503 at first

    def submit(seed: int, what: str, **changes: Any) -> str:
        """POST until accepted; a 503 says retry (the Idempotency-Key keeps it one job)."""
        key = uuid.uuid4().hex
        while True:
            t0 = time.monotonic()
            resp = c.post("/v1/generations", json={**JOB, "seed": seed, **changes},
                          headers={"Idempotency-Key": key})
            seen.add(what, t0, resp.status_code)
            if resp.status_code == 202:
                return str(resp.json()["id"])
            if seed not in refused:
                refused.append(seed)
            assert resp.status_code == 503, resp.text
            time.sleep(0.5)

    # Before: more jobs than the 2 x 2 slots, so some run and some wait when Redis goes.
    ids = [submit(s, "POST") for s in range(8)]
    # The job whose streams stay open across the outage: long, and behind all the others,
    # so that it is certainly not over before Redis goes down.
    running = submit(8, "POST", steps=400, priority="low")
    ids.append(running)
    wait_for(lambda: sum(c.get(f"/v1/generations/{i}").json()["status"] == "running"
                         for i in ids) >= 2, 60, "jobs to be running", workers[0])

    # An event stream open across the outage: it must end (not hang, not a 500), and a
    # reconnect with Last-Event-ID afterwards must carry on to the job's end.
    stream: dict[str, Any] = {"events": [], "ended": None, "error": None}

    def follow() -> None:
        try:
            with c.stream("GET", f"/v1/generations/{running}/events") as resp:
                assert resp.status_code == 200
                for ev in read_sse(resp):
                    stream["events"].append(ev)
        except Exception as e:       # an abrupt close is what we look for
            stream["error"] = repr(e)
        stream["ended"] = time.monotonic()

    def follow_ws() -> None:
        url = api.url.replace("http://", "ws://") + f"/v1/generations/{running}/ws"
        with ws_connect(url, open_timeout=30) as ws:
            try:
                while True:
                    ws.recv(timeout=60)
            except ConnectionClosed as e:
                stream["ws_close"] = e.rcvd.code if e.rcvd else None
            except TimeoutError:
                stream["ws_close"] = "hang"

    followers = [threading.Thread(target=follow, daemon=True),
                 threading.Thread(target=follow_ws, daemon=True)]
    for t in followers:
        t.start()

    # Clients polling every job and submitting more, throughout.
    stop = threading.Event()
    during_ids: list[str] = []

    def poll() -> None:
        while not stop.is_set():
            for i in list(ids + during_ids):
                t0 = time.monotonic()
                try:
                    code = c.get(f"/v1/generations/{i}", timeout=PROMPT * 2).status_code
                except httpx.HTTPError:
                    code = 0                           # a hang or a dropped connection
                seen.add("GET", t0, code)
            time.sleep(0.1)

    def submit_more() -> None:
        seed = 100
        while not stop.is_set():
            during_ids.append(submit(seed, "POST"))
            seed += 1
            time.sleep(1.0)

    threads = [threading.Thread(target=poll, daemon=True),
               threading.Thread(target=submit_more, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(0.5)

    # The outage: a crash (SIGKILL), then a restart on the same port and data.
    before = [c.get(f"/v1/generations/{i}").json()["status"] for i in ids]
    assert before[-1] in ("queued", "running"), "the watched job ended before the outage"
    queued_at_outage = before.count("queued")
    kill_at = time.monotonic()
    aof_redis.kill(signal.SIGKILL)
    down_at = time.monotonic()
    seen.outage = (down_at, float("inf"))
    time.sleep(0.3)
    probe = f"/v1/generations/{ids[0]}"
    for method, path in (("GET", probe), ("POST", "/v1/generations"),
                         ("GET", "/v1/models"), ("GET", f"{probe}/events"),
                         ("GET", f"{probe}/images/0"), ("DELETE", probe),
                         ("GET", "/readyz"), ("GET", "/healthz"), ("GET", "/metrics")):
        t0 = time.monotonic()
        resp = c.request(method, path, json={**JOB, "seed": 1} if method == "POST" else None,
                         timeout=PROMPT)
        seen.add(f"{method} {path}", t0, resp.status_code)
        if path in ("/healthz", "/metrics"):
            assert resp.status_code == 200, resp.text        # liveness does not need Redis
        elif path == "/readyz":
            assert resp.status_code == 503, resp.text
            assert resp.json()["checks"]["redis"].startswith("unreachable"), resp.text
        else:
            check_unavailable(resp, f"{method} {path}")
    t0 = time.monotonic()
    ws_url = api.url.replace("http://", "ws://") + f"{probe}/ws"
    with ws_connect(ws_url, open_timeout=PROMPT) as ws, \
            pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=PROMPT)
    seen.add("WS", t0, 200)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4503, closed.value
    for t in followers:
        t.join(timeout=PROMPT)
        assert not t.is_alive(), "an open event stream hangs while Redis is down"
    time.sleep(max(0.0, down_at + DOWN_FOR - time.monotonic()))
    up_at = time.monotonic()
    seen.outage = (down_at, up_at)
    aof_redis.start()

    # Back: the API answers again without a restart, the workers are the same processes.
    wait_for(lambda: c.get("/readyz").status_code == 200, 60, "the API to be ready again",
             workers[0])
    recovered_s = time.monotonic() - up_at
    time.sleep(1.0)
    dead = [w for w in workers if w.proc.poll() is not None]
    assert not dead, "a worker died because Redis went away:\n" + \
        "\n".join(w.log()[-3000:] for w in dead)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    after_ids = [submit(s, "POST") for s in (200, 201)]
    every = ids + during_ids + after_ids

    def final(i: str) -> str:
        return str(c.get(f"/v1/generations/{i}").json()["status"])

    wait_for(lambda: all(final(i) in ("succeeded", "failed", "canceled") for i in every),
             120, "every job to end", workers[0])
    outcomes = {i: final(i) for i in every}

    # The stream that was cut resumes from its last id to the job's end.
    last_id = next((e["id"] for e in reversed(stream["events"]) if e["id"]), None)
    headers = {"Last-Event-ID": last_id} if last_id else {}
    with c.stream("GET", f"/v1/generations/{running}/events", headers=headers) as resp:
        assert resp.status_code == 200
        rest = list(read_sse(resp))
    resumed = [e["id"] for e in stream["events"] + rest if e["id"]]

    down = seen.during()
    codes = [s for *_, s in seen.calls]
    restarts = sum(w.proc.poll() is not None for w in workers)
    record(jobs_submitted=len(every), jobs_before=len(ids), jobs_during=len(during_ids),
           jobs_after=len(after_ids), jobs_queued_at_outage=queued_at_outage,
           jobs_submitted_while_down=len(refused),
           jobs_succeeded=sum(s == "succeeded" for s in outcomes.values()),
           jobs_lost=sum(s != "succeeded" for s in outcomes.values()),
           requests=len(codes), requests_while_down=len(down),
           status_503_while_down=sum(s == 503 for *_, s in down),
           status_500=sum(s >= 500 and s != 503 for s in codes),
           hangs_or_resets=codes.count(0),
           max_response_s_while_down=round(max((d for _, _, d, _ in down), default=0.0), 2),
           api_ready_again_s=round(recovered_s, 2), redis_down_s=round(up_at - down_at, 2),
           sse_cut_cleanly=stream["error"] is None,
           sse_ended_after_s=round(stream["ended"] - kill_at, 2),
           ws_close_code=stream.get("ws_close"),
           worker_restarts=restarts,
           seconds=round(time.monotonic() - t_start, 1))

    assert restarts == 0, "a worker died after Redis came back"
    assert all(s == "succeeded" for s in outcomes.values()), outcomes
    assert refused, "no submission was made while Redis was down"
    assert 0 not in codes, "a request hung or its connection was dropped"
    assert not [s for s in codes if s >= 500 and s != 503], "a 5xx other than 503"
    assert down and all(s in (503, 200) for what, _, _, s in down), down
    assert all(s == 503 for what, _, _, s in down if what in ("GET", "POST")), down
    assert max(d for _, _, d, _ in down) < PROMPT
    assert stream["error"] is None, f"the event stream broke off: {stream['error']}"
    assert stream.get("ws_close") == 1013, stream.get("ws_close")   # try again later
    assert rest and rest[-1]["event"] == "done", rest[-3:]
    assert len(resumed) == len(set(resumed)), "the resumed stream repeats events"
    assert "Traceback" not in api.log(), api.log()[-4000:]
    c.close()


def read_sse(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    """Events of an SSE response as dicts {event, id, data}, until the server closes it."""
    cur: dict[str, str] = {}
    for line in resp.iter_lines():
        if not line:
            if cur:
                yield {"event": cur.get("event"), "id": cur.get("id"),
                       "data": json.loads(cur.get("data", "null"))}
                cur = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            cur[key] = value.removeprefix(" ")
