"""API faults: thousands of open event streams, clients that leave mid-stream, clients
that read slowly or never finish their request. Real `ddpm api` processes, real Redis,
raw sockets where a well-behaved HTTP client would hide the fault.

The other API faults are tested elsewhere: Redis going away (test_redis_faults.py),
oversized and malformed bodies (test_hostile_input.py, tests/app/test_api.py).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from app.auth import hash_key

KEY_A, KEY_B = "key-a-" + "a" * 40, "key-b-" + "b" * 40


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def open_stream(port: int, job_id: str, key: str | None = None,
                rcvbuf: int | None = None) -> tuple[socket.socket, int, bytes]:
    """GET the job's SSE stream on a raw socket; return it with the status and whatever
    arrived with the headers. The socket is left open (the stream goes on)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    s.sendall(f"GET /v1/generations/{job_id}/events HTTP/1.1\r\nHost: x\r\n"
              f"Accept: text/event-stream\r\n{auth}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(65536)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    length = re.search(rb"(?im)^content-length: (\d+)", head)
    if length:                                 # an error answer: read its body too
        want = head.index(b"\r\n\r\n") + 4 + int(length.group(1))
        while len(head) < want and (chunk := s.recv(65536)):
            head += chunk
    return s, status, head


def open_streams_gauge(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(r"^ddpm_api_open_streams (\S+)$", text, re.M)
    assert m, "ddpm_api_open_streams is exported"
    return float(m.group(1))


def redis_clients(r: redis.Redis) -> int:
    return int(r.info("clients")["connected_clients"])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def queued_job(client: httpx.Client, **body: Any) -> str:
    resp = client.post("/v1/generations", json={"model": "tiny", **body})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def timed(fn: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    resp = fn()
    return resp, time.monotonic() - t0


@contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def advertised(spawn_worker: Callable[..., Any], r: redis.Redis,
               wait_for: Callable[..., object]) -> Any:
    """A live worker advertising `tiny`, so the API accepts jobs."""
    w = spawn_worker("--max-batch", "4")
    wait_for(lambda: r.keys("ddpm:workers:*"), 60, "the worker to advertise", w)
    return w


def test_thousands_of_streams_meet_a_503_not_exhaustion(
        start_api: Callable[..., Any], r: redis.Redis, record: Callable[..., None],
        advertised: Any) -> None:
    limit, tries = 500, 2000
    # Long polls: the open streams wait in XREAD BLOCK, as idle browsers would.
    api = start_api(env={"DDPM_MAX_STREAMS": str(limit), "DDPM_MAX_STREAMS_PER_CALLER": "5000",
                         "DDPM_STREAM_POLL_MS": "10000"})
    advertised.signal(19)      # SIGSTOP: the job stays queued, its stream stays open
    with httpx.Client(base_url=api.url, timeout=30) as c:
        job = queued_job(c)
        base_clients = redis_clients(r)
        statuses: dict[int, int] = {}
        bodies_503: list[bytes] = []
        with closing_all([]) as socks:
            for _ in range(tries):
                s, status, head = open_stream(api.port, job)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    socks.append(s)
                else:
                    bodies_503.append(head)
                    s.close()
            peak_clients = redis_clients(r)
            health, health_s = timed(lambda: c.get("/healthz"))
            post, post_s = timed(lambda: c.post("/v1/generations", json={"model": "tiny"}))
            gauge = open_streams_gauge(api.url)
        assert statuses == {200: limit, 503: tries - limit}, statuses
        head = bodies_503[0]
        assert b"retry-after: " in head.lower()
        error = json.loads(head.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "too_many_streams" and "limit" in error["message"]
        assert health.status_code == 200 and post.status_code == 202
        assert gauge == limit
        # Streams hold Redis connections only up to the cap (plus the API's own few).
        assert peak_clients - base_clients <= limit + 10, (base_clients, peak_clients)

        # Closed streams give their slots back: a new stream opens again.
        deadline = time.monotonic() + 30
        while open_streams_gauge(api.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert open_streams_gauge(api.url) == 0
        s, status, _ = open_stream(api.port, job)
        s.close()
        assert status == 200
    advertised.signal(18)      # SIGCONT
    assert "Traceback" not in api.log(), api.log()[-3000:]
    record(streams_tried=tries, streams_open=statuses.get(200, 0),
           refused_503=statuses.get(503, 0), other_statuses=sorted(set(statuses) - {200, 503}),
           redis_clients_added=peak_clients - base_clients,
           healthz_seconds=round(health_s, 3), post_seconds=round(post_s, 3))


def test_per_caller_limit_is_429_and_the_websocket_is_capped_too(
        start_api: Callable[..., Any], advertised: Any) -> None:
    api = start_api(env={"DDPM_API_KEYS": f"{hash_key(KEY_A)},{hash_key(KEY_B)}",
                         "DDPM_MAX_STREAMS": "6", "DDPM_MAX_STREAMS_PER_CALLER": "4"})
    advertised.signal(19)
    with httpx.Client(base_url=api.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY_A}"}) as a, \
            httpx.Client(base_url=api.url, timeout=30,
                         headers={"Authorization": f"Bearer {KEY_B}"}) as b:
        job_a, job_b = queued_job(a), queued_job(b)
        with closing_all([]) as socks:
            for _ in range(4):
                s, status, _ = open_stream(api.port, job_a, KEY_A)
                socks.append(s)
                assert status == 200
            s, status, head = open_stream(api.port, job_a, KEY_A)
            s.close()
            assert status == 429 and b"too_many_streams" in head
            for _ in range(2):                  # B may still open streams: 6 in all
                s, status, _ = open_stream(api.port, job_b, KEY_B)
                socks.append(s)
                assert status == 200
            s, status, head = open_stream(api.port, job_b, KEY_B)
            s.close()
            assert status == 503, head
            ws_url = api.url.replace("http", "ws") + f"/v1/generations/{job_b}/ws"
            with ws_client.connect(ws_url, additional_headers={
                    "Authorization": f"Bearer {KEY_B}"}) as ws, \
                    pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4503
        # All closed: B gets its WebSocket now.
        deadline = time.monotonic() + 30
        while open_streams_gauge(api.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        with ws_client.connect(ws_url, additional_headers={
                "Authorization": f"Bearer {KEY_B}"}) as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=1)              # open and waiting: the job is queued
            assert open_streams_gauge(api.url) == 1
    advertised.signal(18)


def test_clients_leaving_mid_stream_leave_nothing_behind(
        api: Any, client: httpx.Client, r: redis.Redis, record: Callable[..., None],
        advertised: Any) -> None:
    job = queued_job(client, num_images=4, steps=400, sampler="ddpm", snapshot_every=1)
    base_clients = redis_clients(r)
    left = 0
    for i in range(40):
        s, status, head = open_stream(api.port, job)
        assert status == 200
        got = len(head)
        while got < 2000 * (1 + i % 4):        # leave after a few frames, at varying points
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        if i % 2:                               # half of them reset the connection
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        left += 1
    deadline = time.monotonic() + 30
    while open_streams_gauge(api.url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_streams_gauge(api.url) == 0, "every stream of a client that left is closed"
    assert redis_clients(r) <= base_clients + 5
    status = client.get(f"/v1/generations/{job}").json()["status"]
    assert status in {"queued", "running", "succeeded"}
    client.delete(f"/v1/generations/{job}")
    log = api.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    record(clients_left_mid_stream=left, streams_open_after=0,
           redis_clients_added=redis_clients(r) - base_clients)


def test_a_client_that_never_reads_costs_bounded_memory_and_blocks_no_one(
        api: Any, client: httpx.Client, record: Callable[..., None], advertised: Any) -> None:
    # Many large frames: 16 images × a frame each step, far more than the socket buffers.
    # (250 steps: 3984 frames fit the default stream byte budget, DDPM_STREAM_MAX_BYTES.)
    job = queued_job(client, num_images=16, steps=250, sampler="ddim", snapshot_every=1)
    rss0 = rss_mb(api.proc.pid)
    s, status, _ = open_stream(api.port, job, rcvbuf=4096)
    assert status == 200
    slow_ok: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while client.get(f"/v1/generations/{job}").json()["status"] != "succeeded":
            resp, seconds = timed(lambda: client.get("/healthz"))
            assert resp.status_code == 200
            slow_ok.append(seconds)
            assert time.monotonic() < deadline, "the job finishes while a client stalls"
            time.sleep(0.5)
        rss1 = rss_mb(api.proc.pid)
        # Another client streams the same job to its end while the first still stalls.
        with httpx.Client(base_url=api.url, timeout=60) as other, \
                other.stream("GET", f"/v1/generations/{job}/events") as resp:
            events = [line for line in resp.iter_lines() if line.startswith("event:")]
        assert events[-1] == "event: done"
        frames = sum(1 for e in events if e == "event: snapshot")
        # The stalled stream buffers at most what flow control lets through.
        assert rss1 - rss0 < 50, (rss0, rss1)
    finally:
        s.close()
    record(frames_in_job=frames, api_rss_mb_before=round(rss0, 1),
           api_rss_mb_during_stall=round(rss1, 1), healthz_max_seconds=round(max(slow_ok), 3))


def test_half_sent_requests_do_not_starve_other_clients(
        api: Any, client: httpx.Client, record: Callable[..., None]) -> None:
    with closing_all([]) as socks:
        for i in range(300):                   # slowloris: headers that never end
            s = connect(api.port)
            s.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                      if i % 2 else b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        times = []
        for _ in range(20):
            resp, seconds = timed(lambda: client.get("/healthz"))
            assert resp.status_code == 200
            times.append(seconds)
        assert client.get("/v1/models").status_code == 200
    assert "Traceback" not in api.log()
    record(stalled_connections=300, healthz_max_seconds=round(max(times), 3))
