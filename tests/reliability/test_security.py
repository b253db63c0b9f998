"""Security: keys, job isolation, job ids, the models directory, pickles, CORS, headers,
secrets in logs, all against real processes (API, worker, Redis).

Already covered elsewhere, and not repeated here: a second key gets 404 for GET, /images,
/grid.png, /events, DELETE and the WebSocket of a finished job, and no key or a wrong one
is 401 (tests/app/test_api.py::test_keys_isolate_jobs); the loader never unpickles and
refuses a pickle disguised as safetensors, in-process (tests/models/test_checkpoint.py:
test_loader_never_unpickles, test_pickle_disguised_as_safetensors); both images run as a
non-root USER (tests/deploy/test_deploy_files.py::
test_dockerfile_runs_unprivileged_with_a_healthcheck); the page works under its CSP in a
real browser (tests/app/test_page.py).

Here: isolation on every route (animation.gif too) of a running job as well as a finished
one, answers that do not tell another key's job from no job, Idempotency-Keys scoped per
key; raw keys nowhere (settings, start-up errors, the API log at DEBUG, any Redis key or
value) and every configured digest compared with hmac.compare_digest; 128-bit random job
ids; a hostile models directory (symlinks out of it, a name with a newline, pickles as
weights and next to them) served by a real worker, and model names that try to leave it;
CORS off; security headers on the page; JSON-only errors; no Redis password in any log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from pydantic import ValidationError
from rq import Queue
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.auth import KeyAuth, new_key
from app.errors import ApiError
from app.routes.page import PAGE_HEADERS
from app.settings import ApiSettings
from contract.keys import JOB_FUNC, SERIALIZER, queue_name
from contract.workers import advertise_worker
from ddpm.redis_server import free_port
from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[2]
JOB_ROUTES = ("", "/events", "/images/0", "/grid.png", "/animation.gif")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(r: httpx.Response, status: int, what: object = "") -> dict[str, Any]:
    """The shared JSON error shape, with the expected status."""
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json", (what, r.headers)
    err = r.json()["error"]
    assert set(err) <= {"code", "message", "field"} and err["code"] and err["message"], err
    return err


def _ws_close_code(api_url: str, job_id: str, headers: dict[str, str]) -> int:
    """The close code of a WebSocket that gets no event (refused after the handshake)."""
    url = api_url.replace("http://", "ws://") + f"/v1/generations/{job_id}/ws"
    with connect(url, additional_headers=headers, open_timeout=10) as ws, \
            pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def _ws_last_event(api_url: str, job_id: str, headers: dict[str, str]) -> str:
    url = api_url.replace("http://", "ws://") + f"/v1/generations/{job_id}/ws"
    last = ""
    with connect(url, additional_headers=headers, open_timeout=10) as ws:
        try:
            while True:
                last = json.loads(ws.recv(timeout=60))["event"]
        except ConnectionClosed:
            pass
    return last


def _wait_status(c: httpx.Client, job_id: str, statuses: set[str], headers: dict[str, str],
                 timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(c.get(f"/v1/generations/{job_id}", headers=headers).json()["status"])
        if status in statuses or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def _redis_contents(r: redis.Redis) -> list[bytes]:
    """Every key, and every value of every type, plus the zlib-inflated form of values RQ
    compresses: what someone with read access to Redis sees."""
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                out += [k, v]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
        elif kind == b"stream":
            for _, fields in r.xrange(key):
                for k, v in fields.items():
                    out += [k, v]
    inflated = []
    for value in out:
        with contextlib.suppress(zlib.error):
            inflated.append(zlib.decompress(value))
    return out + inflated


# -- keys: isolation and secrecy ------------------------------------------------------------


def test_a_key_reaches_only_its_own_jobs_and_never_leaks(
        start_api: Callable[..., Any], spawn_worker: Callable[..., Any], r: redis.Redis,
        wait_for: Callable[..., object], record: Callable[..., None]) -> None:
    """Key B gets exactly the 404 of a job that does not exist on every route of A's
    finished and running jobs (no existence oracle), cannot cancel A's running job, and does
    not get A's job back for the same Idempotency-Key; no key or a wrong key is 401
    everywhere. After all that, neither raw key nor any token tried appears in the API log
    (at DEBUG) or anywhere in Redis."""
    key_a, digest_a = new_key()
    key_b, digest_b = new_key()
    api = start_api(env={"DDPM_API_KEYS": f"{digest_a},{digest_b}", "DDPM_RATE_LIMIT": "0",
                         "DDPM_LOG_LEVEL": "DEBUG"})
    worker = spawn_worker()
    a, b = _bearer(key_a), _bearer(key_b)
    wrong_tokens = [f"wrong-{uuid.uuid4().hex}", key_a[:-1] + ("x" if key_a[-1] != "x" else "y"),
                    ("x" if key_a[0] != "x" else "y") + key_a[1:], key_a + "x", "k" * 600]
    requests = 0
    with httpx.Client(base_url=api.url, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 120, "a worker", worker=worker)
        done = c.post("/v1/generations", headers=a, json={
            "model": "tiny", "num_images": 2, "steps": 2, "snapshot_every": 1})
        assert done.status_code == 202, done.text
        done_id = done.json()["id"]
        assert _wait_status(c, done_id, {"succeeded", "failed"}, a) == "succeeded"
        running = c.post("/v1/generations", headers=a,        # minutes of work: canceled
                         json={"model": "tiny", "steps": 1000, "num_images": 64})
        running_id = running.json()["id"]
        assert _wait_status(c, running_id, {"running"}, a, timeout=60) == "running"
        requests += 2

        # A reaches its finished job on every route; B gets what an unknown id gets.
        unknown = uuid.uuid4().hex
        for path in JOB_ROUTES:
            assert c.get(f"/v1/generations/{done_id}{path}", headers=a).status_code == 200
            for job_id in (done_id, running_id):
                theirs = c.get(f"/v1/generations/{job_id}{path}", headers=b)
                nobody = c.get(f"/v1/generations/{unknown}{path}", headers=b)
                _error(theirs, 404, (job_id, path))
                assert theirs.json() == nobody.json(), (path, theirs.text, nobody.text)
                requests += 2
            requests += 1
        for job_id in (done_id, running_id):
            theirs = c.delete(f"/v1/generations/{job_id}", headers=b)
            _error(theirs, 404, job_id)
            assert theirs.json() == c.delete(f"/v1/generations/{unknown}", headers=b).json()
            assert _ws_close_code(api.url, job_id, b) == 4404
            requests += 3
        # B's DELETE did nothing: A's job is still running, and A can still cancel it.
        assert _wait_status(c, running_id, {"running"}, a, timeout=1) == "running"
        assert _ws_last_event(api.url, done_id, a) == "done"
        assert c.delete(f"/v1/generations/{running_id}", headers=a).status_code == 200
        assert _wait_status(c, running_id, {"canceled"}, a) == "canceled"
        requests += 3

        # No key, or a wrong one: 401 on every route, 4401 on the WebSocket.
        for path in JOB_ROUTES:
            _error(c.get(f"/v1/generations/{done_id}{path}"), 401, path)
        for method, path in (("DELETE", f"/v1/generations/{done_id}"),
                             ("POST", "/v1/generations"), ("GET", "/v1/models"),
                             ("GET", "/v1/models/tiny")):
            r401 = c.request(method, path, json={"model": "tiny"} if method == "POST" else None)
            assert _error(r401, 401, path)["code"] == "unauthorized"
            assert r401.headers["www-authenticate"] == "Bearer"
        assert _ws_close_code(api.url, done_id, {}) == 4401
        requests += len(JOB_ROUTES) + 5
        bad_headers = [_bearer(t) for t in wrong_tokens] + [
            {"Authorization": f"Basic {key_a}"}, {"Authorization": key_a},
            {"Authorization": "Bearer"}, {"Authorization": f"Token {key_a}"}]
        for headers in bad_headers:
            _error(c.get(f"/v1/generations/{done_id}", headers=headers), 401, headers)
            assert _ws_close_code(api.url, done_id, headers) == 4401, headers
            requests += 2

        # Idempotency-Keys are per key: B's replay of A's key makes B's own job.
        body = {"model": "tiny", "steps": 1, "seed": 3}
        first = c.post("/v1/generations", headers={**a, "Idempotency-Key": "shared"}, json=body)
        other = c.post("/v1/generations", headers={**b, "Idempotency-Key": "shared"}, json=body)
        again = c.post("/v1/generations", headers={**b, "Idempotency-Key": "shared"}, json=body)
        assert first.status_code == other.status_code == again.status_code == 202
        assert other.json()["id"] != first.json()["id"]
        assert "idempotent-replayed" not in other.headers
        assert again.json()["id"] == other.json()["id"]
        assert c.get(f"/v1/generations/{first.json()['id']}", headers=b).status_code == 404
        requests += 4
        for job in (first, other):
            _wait_status(c, job.json()["id"], {"succeeded"}, a if job is first else b)

    # Nothing secret in the log of all that, nor in Redis.
    log = api.log()
    assert "GET /v1/generations" in log, "DEBUG logging should show the requests"
    secrets = [key_a, key_b, *wrong_tokens]
    for s in secrets:
        assert s not in log, f"a token reached the API log: {s[:8]}…"
    # At DEBUG the WebSocket handshakes are logged header by header: redacted (app/redact.py).
    logged = re.findall(r"(?im)[<>] authorization: (.*)$", log)
    assert logged and set(logged) == {"[redacted]"}, logged
    stored = b"\n".join(_redis_contents(r))
    for s in secrets:
        assert s.encode() not in stored, f"a token reached Redis: {s[:8]}…"
    assert "Traceback" not in log, log[-3000:]
    record(http_requests=requests, redis_values_scanned=len(_redis_contents(r)),
           secrets_in_log=0, secrets_in_redis=0)


def test_keys_are_configured_as_digests_and_compared_in_constant_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings take SHA-256 digests only and refuse a raw key without echoing it (the API
    process too); authenticating compares the presented key's digest with every configured
    digest through hmac.compare_digest, with no early exit, so a key wrong in its first or
    its last character fails the same way after the same work."""
    key_a, digest_a = new_key()
    key_b, digest_b = new_key()
    assert ApiSettings(api_keys=f"{digest_a}, sha256:{digest_b.upper()}").api_keys == \
        [digest_a, digest_b]
    for bad in (key_a, digest_a[:-1], "g" * 64, f"{digest_a},{key_b}"):
        with pytest.raises(ValidationError) as refused:
            ApiSettings(api_keys=bad)
        assert "digest" in str(refused.value)
        assert key_a not in str(refused.value) and key_b not in str(refused.value)
    # The real process: refuses to start, and says why without printing the key.
    proc = subprocess.run([sys.executable, "-m", "ddpm", "api", "--port", str(free_port())],
                          cwd=ROOT, env={**os.environ, "DDPM_API_KEYS": key_a},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "digest" in proc.stderr, proc.stderr
    assert key_a not in proc.stdout + proc.stderr, "the raw key was printed"

    third = hashlib.sha256(b"a third key").hexdigest()
    auth = KeyAuth([digest_a, digest_b, third])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(x: Any, y: Any) -> bool:
        calls.append((x, y))
        return real(x, y)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert auth.identify(f"Bearer {key_a}", "1.2.3.4").owner == digest_a[:16]
    assert len(calls) == 3, "every configured digest is compared, even after a match"
    messages = []
    for wrong in (("x" if key_a[0] != "x" else "y") + key_a[1:],
                  key_a[:-1] + ("x" if key_a[-1] != "x" else "y"), key_a * 7):
        calls.clear()
        with pytest.raises(ApiError) as refused_key:
            auth.identify(f"Bearer {wrong}", "1.2.3.4")
        assert refused_key.value.status == 401
        messages.append(refused_key.value.message)
        # Digests, never the presented text: the work does not depend on the key's length.
        assert len(calls) == 3 and all(len(x) == len(y) == 32 for x, y in calls), calls
    assert len(set(messages)) == 1, messages
    assert all(isinstance(d, bytes) and len(d) == 32 for d in auth.digests)


def test_job_ids_are_128_bit_random(start_api: Callable[..., Any], r: redis.Redis,
                                    record: Callable[..., None]) -> None:
    """Ids of many submissions are uuid4s (32 hex chars, 122 random bits), distinct, with
    about half their bits changing from one to the next (not a counter); neighbours of a
    real id are 404. (A worker advertisement is written to Redis so that `tiny` counts as
    served; the jobs stay queued.)"""
    api = start_api(env={"DDPM_RATE_LIMIT": "0"})
    ad = {"name": "ids", "models": [{"name": "tiny", "image_size": 16, "in_channels": 3,
                                     "num_timesteps": 1000}], "draining": False}
    advertise_worker(r, "ids", json.dumps(ad), 600, time.time())
    n = 64
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ids = []
        for _ in range(n):
            resp = c.post("/v1/generations", json={"model": "tiny", "steps": 1})
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
        for job_id in ids:
            assert re.fullmatch(r"[0-9a-f]{32}", job_id), job_id
            u = uuid.UUID(job_id)
            assert u.version == 4 and u.variant == uuid.RFC_4122, job_id
        assert len(set(ids)) == n
        values = [int(i, 16) for i in ids]
        flips = [bin(x ^ y).count("1") for x, y in itertools.pairwise(values)]
        assert 40 <= sum(flips) / len(flips) <= 80, flips        # ~61 for 122 random bits
        assert len({y - x for x, y in itertools.pairwise(values)}) == n - 1
        ones = sum(bin(v).count("1") for v in values) - n * (1 + 1)   # version/variant bits
        assert 0.45 <= ones / (n * 122) <= 0.55, ones / (n * 122)
        probes = [f"{values[0] + 1:032x}", f"{values[-1] - 1:032x}", uuid.uuid4().hex]
        for probe in probes:
            _error(c.get(f"/v1/generations/{probe}"), 404, probe)
            _error(c.delete(f"/v1/generations/{probe}"), 404, probe)
    record(ids=n, mean_bits_flipped=round(sum(flips) / len(flips), 1),
           http_requests=n + 2 * len(probes))


# -- the models directory ------------------------------------------------------------------


class _Touch:
    """Unpickling this creates `marker` (pathlib's own function: importable anywhere)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _hostile_models_dir(tmp_path: Path, models_dir: Path, marker: Path) -> Path:
    """`tiny` (a copy, with pickles beside its weights), `inner` (a symlink to it: inside),
    `escape` (a symlink to a checkpoint outside), `leak` (its weights a symlink outside),
    `loop` (its weights a symlink to itself), `tiny\\n` (a name the API could never ask
    for), `evil` and `evilzip` (pickles as weights)."""
    root = tmp_path / "hostile-models"
    root.mkdir()
    shutil.copytree(models_dir / "tiny", root / "tiny")
    raw = pickle.dumps(_Touch(marker))
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt", "model.pkl"):
        (root / "tiny" / name).write_bytes(raw)
    torch.save({"w": _Touch(marker)}, root / "tiny" / "diffusion_pytorch_model.bin")
    (root / "inner").symlink_to("tiny")
    (root / "escape").symlink_to(models_dir / "tinycond")
    (root / "leak").mkdir()
    shutil.copy(models_dir / "tiny" / CONFIG_FILE, root / "leak" / CONFIG_FILE)
    (root / "leak" / WEIGHTS_FILE).symlink_to(models_dir / "tiny" / WEIGHTS_FILE)
    (root / "loop").mkdir()
    shutil.copy(models_dir / "tiny" / CONFIG_FILE, root / "loop" / CONFIG_FILE)
    (root / "loop" / WEIGHTS_FILE).symlink_to(WEIGHTS_FILE)          # itself
    shutil.copytree(models_dir / "tiny", root / "tiny\n")
    for name in ("evil", "evilzip"):
        (root / name).mkdir()
        shutil.copy(models_dir / "tiny" / CONFIG_FILE, root / name / CONFIG_FILE)
    (root / "evil" / WEIGHTS_FILE).write_bytes(raw)
    torch.save({"w": _Touch(marker)}, root / "evilzip" / WEIGHTS_FILE)
    return root


ESCAPING_NAMES = ["../tiny", "/etc/passwd", "tiny/../../x", "..", ".", "%2e%2e",
                  "..%2ftiny", "tiny%00", "tiny\x00", "t\u0456ny", "\uff54\uff49\uff4e\uff59",
                  "tiny\u2215..", "tiny\\..\\x", "tiny\n", "~root", ".hidden", "-rf", "",
                  "a" * 65, "tiny/", "C:\\models\\tiny", "file:///etc/passwd"]


def test_a_hostile_models_directory_serves_only_safe_checkpoints_inside_it(
        tmp_path: Path, models_dir: Path, spawn_worker: Callable[..., Any],
        start_api: Callable[..., Any], r: redis.Redis, wait_for: Callable[..., object],
        record: Callable[..., None]) -> None:
    """A real worker over a models directory with symlinks out of it, a name with a newline
    and pickles (as weights, and next to good weights): it serves `tiny` and `inner` only,
    reports `evil`/`evilzip` broken (their jobs fail saying so), never unpickles (the marker
    is never created), and skips what leads outside. Model names that try to leave the
    directory are a 422 at the API and a clean failure when injected straight into a queue."""
    marker = tmp_path / "UNPICKLED"
    pickle.loads(pickle.dumps(_Touch(marker)))           # the payload does fire when loaded
    assert marker.exists()
    marker.unlink()
    root = _hostile_models_dir(tmp_path, models_dir, marker)
    worker = spawn_worker(models=root)
    api = start_api()
    with httpx.Client(base_url=api.url, timeout=30) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 120, "the worker", worker=worker)
        served = {m["name"] for m in c.get("/v1/models").json()["models"]}
        assert served == {"tiny", "inner"}, served
        (ad,) = [json.loads(v) for v in r.mget(r.keys("ddpm:workers:*")) if v]
        assert set(ad["broken"]) == {"evil", "evilzip"}, ad["broken"]
        assert all("safetensors" in why for why in ad["broken"].values()), ad["broken"]
        for name in ("escape", "leak", "loop", "evil", "evilzip"):
            err = _error(c.post("/v1/generations", json={"model": name}), 404, name)
            assert err["field"] == "model"
            _error(c.get(f"/v1/models/{name}"), 404, name)
        for name in ESCAPING_NAMES:
            err = _error(c.post("/v1/generations", json={"model": name}), 422, repr(name))
            assert err["field"] == "model", (name, err)
        for path in ("/v1/models/..%2fescape", "/v1/models/%2e%2e%2ftiny", "/v1/models/tiny%0a",
                     "/v1/models/..%5ctiny", "/v1/models/%2fetc%2fpasswd"):
            _error(c.get(path), 404, path)
        ok = c.post("/v1/generations", json={"model": "inner", "steps": 2})
        assert ok.status_code == 202, ok.text
        ok_id = ok.json()["id"]
        wait_for(lambda: c.get(f"/v1/generations/{ok_id}").json()["status"] == "succeeded",
                 60, "a job on the symlink inside", worker=worker)

    # Straight into the queues the worker reads: names that leave the directory, and the
    # broken models. Each fails with its reason; the escaping entries have no queue at all.
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    injected = {name: q.enqueue(JOB_FUNC, kwargs={"model": name, "steps": 1}).id
                for name in ("../tiny", "/etc/passwd", "tiny/../../x", "..", "tiny\n")}
    evil = Queue(queue_name("evil"), connection=r, serializer=SERIALIZER).enqueue(
        JOB_FUNC, kwargs={"model": "evil", "steps": 1})
    escape = Queue(queue_name("escape"), connection=r, serializer=SERIALIZER).enqueue(
        JOB_FUNC, kwargs={"model": "escape", "steps": 1})

    def status(job_id: str) -> bytes | None:
        return r.hget(f"rq:job:{job_id}", "status")  # type: ignore[return-value]

    wait_for(lambda: all(status(j) == b"failed" for j in [*injected.values(), evil.id]), 60,
             "the injected jobs to fail", worker=worker)
    for name, job_id in injected.items():
        assert "model: String should match pattern" in (
            q.fetch_job(job_id).latest_result().exc_string or ""), name  # type: ignore[union-attr]
    why = evil.latest_result()
    assert why is not None and "failed to load" in (why.exc_string or "")
    assert status(escape.id) == b"queued", "no worker reads the queue of a skipped entry"
    assert not marker.exists(), "a pickle was loaded"
    log = worker.log()
    for name in ("escape", "leak", "loop"):
        assert re.search(rf"skipping \S*/{name}: a symlink leads out", log), log[-3000:]
    assert "not a valid model name" in log
    assert worker.proc.poll() is None
    record(models_served=len(served), broken=2, skipped=4, marker_created=0,
           escaping_names_refused=len(ESCAPING_NAMES), injected_jobs_failed=len(injected) + 1)


# -- the HTTP surface ----------------------------------------------------------------------


def test_cors_is_off_and_the_page_sends_security_headers(api: Any) -> None:
    """No Access-Control-* header for a foreign Origin, simple or preflight; the page has
    its CSP and friends; every error is JSON in the shared shape, never HTML, even for a
    path that looks like markup."""
    evil = {"Origin": "https://evil.example"}
    with httpx.Client(base_url=api.url, timeout=30) as c:
        answers = [
            c.get("/v1/models", headers=evil), c.get("/healthz", headers=evil),
            c.post("/v1/generations", json={"model": "tiny"}, headers=evil),
            c.get("/", headers=evil),
            c.options("/v1/generations", headers={
                **evil, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"}),
            c.options("/v1/models", headers={**evil, "Access-Control-Request-Method": "GET"}),
        ]
        for resp in answers:
            leaked = [h for h in resp.headers if h.lower().startswith("access-control-")]
            assert not leaked, (resp.request.method, resp.request.url, leaked)
        assert answers[4].status_code == 405, "a preflight is not answered with a 2xx"
        _error(answers[4], 405)

        for method in ("GET", "HEAD"):
            page = c.request(method, "/")
            assert page.status_code == 200 and page.headers["content-type"].startswith(
                "text/html")
            for name, value in PAGE_HEADERS.items():
                assert page.headers.get(name) == value, (name, page.headers.get(name))
        csp = PAGE_HEADERS["Content-Security-Policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "object-src 'none'",
                          "frame-ancestors 'none'", "base-uri 'none'"):
            assert directive in csp, directive
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp
        assert PAGE_HEADERS["X-Content-Type-Options"] == "nosniff"
        assert PAGE_HEADERS["X-Frame-Options"] == "DENY"

        for method, path in (("GET", "/<script>alert(1)</script>"),
                             ("GET", "/v1/generations/<img src=x onerror=alert(1)>"),
                             ("GET", "/v1/models/<b>x</b>"), ("PUT", "/v1/models"),
                             ("GET", "/static/../app/auth.py"), ("GET", "/static/%2e%2e/main.py")):
            resp = c.request(method, path)
            assert resp.status_code in (404, 405), (path, resp.status_code)
            assert resp.headers["content-type"] == "application/json", (path, resp.headers)
            _error(resp, resp.status_code, path)
        bad = c.post("/v1/generations", content=b"<html>", headers={"content-type": "text/html"})
        assert bad.headers["content-type"] == "application/json" and bad.status_code == 415


def test_a_redis_password_never_reaches_a_log_or_a_client(
        start_api: Callable[..., Any], models_dir: Path) -> None:
    """Redis URLs carry passwords: the API (readyz, 503s, its log) and the worker (its
    start-up error) name the server, never the password."""
    password = "hunter2-" + uuid.uuid4().hex[:8]
    url = f"redis://admin:{password}@127.0.0.1:{free_port()}/0"     # nothing listens there
    api = start_api(redis=url)
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.text
        down = c.post("/v1/generations", json={"model": "tiny"})
        assert _error(down, 503)["code"] == "unavailable"
        for resp in (ready, down):
            assert password not in resp.text
    assert password not in api.log()
    worker = subprocess.run(
        [sys.executable, "-m", "ddpm", "worker", "--redis-url", url, "--models-dir",
         str(models_dir), "--device", "cpu"],
        cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True,
        text=True, timeout=120)
    said = worker.stdout + worker.stderr
    assert worker.returncode != 0 and "cannot reach Redis" in said, said
    assert password not in said, said
    assert "admin:***@127.0.0.1" in said, said
