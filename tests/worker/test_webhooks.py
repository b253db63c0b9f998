"""Completion webhooks from a live worker to a real local HTTP server: signed as Standard
Webhooks (checked with the official `standardwebhooks` package and the README's snippet),
retried on 5xx, 408, 429 and timeouts with doubling, capped delays, never on another 4xx,
never following a redirect, sent for canceled jobs, counted in the worker's metrics."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from rq.job import JobStatus

from contract.queueing import cancel, enqueue, fetch_job
from contract.spec import GenerationSpec
from ddpm.redis_server import free_port
from worker.settings import (
    MAKE_WEBHOOK_SECRET,
    WEBHOOK_KEY_MIN_BYTES,
    WorkerSettings,
    webhook_signing_key,
)
from worker.webhooks import retry_delay, sign

ROOT = Path(__file__).resolve().parents[2]
SLOW = {"model": "tiny", "steps": 1000, "sampler": "ddpm"}   # ~10 s on a 2-core CPU
BACKOFF, MAX_BACKOFF, ATTEMPTS = 0.05, 0.15, 4    # delays 0.05, 0.1, then capped at 0.15
# The timeout only has to outlast a loaded machine's answer to a local request: the hanging
# receiver holds its request until the worker gives up, whatever the timeout.
TIMEOUT = 3.0
BODY_KEYS = {"type", "job_id", "status", "enqueued_at", "ended_at", "error"}   # the README's
HANG_LIMIT = 60.0   # a hanging request ends by then even if the worker never gives up


def make_secret() -> str:
    """A secret made exactly as the README and the worker's refusal say to make one."""
    out = subprocess.run(shlex.split(MAKE_WEBHOOK_SECRET.replace("python", sys.executable, 1)),
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def secret() -> str:
    return make_secret()


def readme_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The README's `verify` function, as a user copies it."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                if "def verify(secret" in b]
    scope: dict[str, Any] = {}
    exec(block, scope)
    return scope["verify"]


class Receiver:
    """An HTTP server (its own threads) answering each path with a script of responses
    (status, (status, location), or "hang": hold the request until the worker gives up
    and closes the connection); the last one repeats."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.calls: list[dict[str, Any]] = []
        self.scripts: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.calls.append({"path": self.path, "headers": dict(self.headers),
                                           "body": body})
                    script = receiver.scripts.get(self.path, [204])
                    step = script.pop(0) if len(script) > 1 else script[0]
                if step == "hang":      # no answer at all: the worker's timeout must end it
                    self.connection.settimeout(HANG_LIMIT)
                    with contextlib.suppress(TimeoutError):
                        self.connection.recv(1)     # b"" once the worker hangs up
                    self.close_connection = True
                    return
                if isinstance(step, tuple):     # (302, location)
                    self.send_response(step[0])
                    self.send_header("Location", step[1])
                else:
                    self.send_response(step)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def to(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if c["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def verified(secret: str, call: dict[str, Any]) -> dict[str, Any]:
    """The body, once the official verifier and the README's snippet both accept it (and
    both refuse it with another secret)."""
    headers = {k.lower(): v for k, v in call["headers"].items()}
    body = standardwebhooks.Webhook(secret).verify(call["body"], headers)
    verify = readme_verify()
    assert verify(secret, headers, call["body"]), headers
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    assert not verify(other, headers, call["body"])
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(other).verify(call["body"], headers)
    return body


def metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def logged_delays(log: str, job_id: str) -> list[float]:
    """The waits the worker scheduled before each retry of `job_id`'s webhook, as it logged
    them (the schedule it computed, not a measured time)."""
    return [float(d) for d in re.findall(rf"for job {job_id}: .*; attempt \d+ in ([0-9.e-]+)s",
                                         log)]


def test_webhooks_are_signed_retried_never_redirected_and_counted(
        r, spawn_worker, wait_for, receiver: Receiver, secret: str) -> None:
    elsewhere = Receiver("127.0.0.2")           # where a redirect points: another host
    try:
        receiver.scripts = {"/flaky": ["hang", 500, 200], "/moved": [(302, elsewhere.url + "/x")],
                            "/down": [503], "/ok": [200], "/busy": [429, 408, 200],
                            "/bad": [400], "/gone": [404]}
        env = {"DDPM_WEBHOOK_SECRET": secret, "DDPM_WEBHOOK_BACKOFF": str(BACKOFF),
               "DDPM_WEBHOOK_MAX_BACKOFF": str(MAX_BACKOFF),
               "DDPM_WEBHOOK_TIMEOUT": str(TIMEOUT), "DDPM_WEBHOOK_ATTEMPTS": str(ATTEMPTS)}
        port = free_port()
        w = spawn_worker("--max-batch", "8", "--metrics-port", str(port), env=env)
        jobs = {path: enqueue(r, GenerationSpec(model="tiny", steps=2, seed=i),
                              webhook=receiver.url + path)
                for i, path in enumerate(receiver.scripts)}
        for job in jobs.values():
            wait_for(lambda job=job: fetch_job(r, job.id).get_status() == JobStatus.FINISHED,
                     60, "the jobs", w)

        # A timeout and a 5xx are retried (same webhook-id), each attempt signed; the body
        # has the README's keys, `error` null on success.
        flaky = wait_for(lambda: len(receiver.to("/flaky")) >= 3 and receiver.to("/flaky"),
                         30, "three attempts at /flaky", w)
        ids = {c["headers"]["webhook-id"] for c in flaky}
        assert len(ids) == 1 and len(flaky) == 3, flaky
        for call in flaky:
            body = verified(secret, call)
            assert set(body) == BODY_KEYS, body
            assert body["type"] == "generation.succeeded" and body["status"] == "finished"
            assert body["job_id"] == jobs["/flaky"].id and body["error"] is None
        # 429 and 408 are retried until the answer is a 2xx.
        wait_for(lambda: len(receiver.to("/busy")) >= 3, 30, "three attempts at /busy", w)
        # A redirect is an answer, not followed and not retried; nor is a plain 4xx.
        wait_for(lambda: metric(port, "ddpm_worker_webhook_deliveries_total",
                                outcome="rejected") == 3, 30, "/moved, /bad, /gone rejected", w)
        assert len(receiver.to("/moved")) == 1 and not elsewhere.calls
        assert len(receiver.to("/bad")) == len(receiver.to("/gone")) == 1
        # Bounded attempts, then given up and counted.
        wait_for(lambda: metric(port, "ddpm_worker_webhook_deliveries_total",
                                outcome="gave_up") == 1, 30, "/down given up", w)
        assert len(receiver.to("/down")) == ATTEMPTS
        wait_for(lambda: metric(port, "ddpm_worker_webhook_deliveries_total",
                                outcome="delivered") == 3, 30, "/flaky, /ok, /busy delivered",
                 w)
        assert len(receiver.to("/busy")) == 3 and len(receiver.to("/ok")) == 1
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="5xx") == 1 + ATTEMPTS
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="4xx") == 4
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="timeout") == 1
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="3xx") == 1
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="2xx") == 3
        # The waits between attempts: the backoff, doubling, then capped.
        assert logged_delays(w.log(), jobs["/down"].id) == pytest.approx(
            [BACKOFF, 2 * BACKOFF, MAX_BACKOFF])
        assert logged_delays(w.log(), jobs["/busy"].id) == pytest.approx([BACKOFF, 2 * BACKOFF])

        # A canceled job's webhook, with its reason.
        doomed = enqueue(r, GenerationSpec(**SLOW), webhook=receiver.url + "/canceled")
        wait_for(lambda: fetch_job(r, doomed.id).get_status() == JobStatus.STARTED, 60,
                 "the slow job to start", w)
        cancel(r, doomed.id)
        (call,) = wait_for(lambda: receiver.to("/canceled"), 30, "the canceled webhook", w)
        body = verified(secret, call)
        assert set(body) == BODY_KEYS, body
        assert body["type"] == "generation.canceled" and body["status"] == "canceled"
        assert body["job_id"] == doomed.id and body["error"] == "canceled"
    finally:
        elsewhere.close()


def test_retry_delays_double_up_to_the_cap() -> None:
    s = WorkerSettings()            # the defaults: 2 s doubling, capped at an hour
    delays = [retry_delay(s, n) for n in range(1, 21)]
    assert delays[:4] == [s.webhook_backoff, 2 * s.webhook_backoff, 4 * s.webhook_backoff,
                          8 * s.webhook_backoff]
    assert max(delays) == delays[-1] == s.webhook_max_backoff


def test_the_documented_secret_verifies_with_the_official_package(secret: str) -> None:
    assert MAKE_WEBHOOK_SECRET in (ROOT / "README.md").read_text()
    WorkerSettings(webhook_secret=secret)
    body, ts = json.dumps({"job_id": "x"}).encode(), int(time.time())
    headers = {"webhook-id": "msg_x", "webhook-timestamp": str(ts)}
    # With or without its base64 padding, the key is what the official package decodes.
    for form in (secret, secret.rstrip("=")):
        signature = sign(webhook_signing_key(form), "msg_x", ts, body)
        standardwebhooks.Webhook(secret).verify(body, {**headers, "webhook-signature": signature})


def _b64(n: int) -> str:
    return "whsec_" + "QUJD" * (n // 3)        # base64 of "ABC" repeated: n bytes


@pytest.mark.parametrize(("bad", "says"), [
    ("raw-secret-0123456789abc", "must be 'whsec_' followed by the base64"),
    ("0123456789abcdef0123456789abcdef", "must be 'whsec_' followed by the base64"),
    # URL-safe base64 (- and _): a lenient decoder would drop those and sign with another key
    ("whsec_QUJDQUJD-QUJDQUJD_QUJDQUJD-QUJDQUJD_QUJDQUJD", "is not standard base64"),
    (_b64(WEBHOOK_KEY_MIN_BYTES - 3), f"is {WEBHOOK_KEY_MIN_BYTES - 3} bytes once "
                                      f"base64-decoded; it needs at least "
                                      f"{WEBHOOK_KEY_MIN_BYTES}"),
    ("whsec_" + "A" * 2000, "characters long"),
])
def test_a_secret_not_in_the_standard_form_is_refused_at_start(bad: str, says: str) -> None:
    with pytest.raises(ValidationError) as e:
        WorkerSettings(webhook_secret=bad)
    message = str(e.value)
    assert says in message and MAKE_WEBHOOK_SECRET in message, message
    assert bad.removeprefix("whsec_")[:12] not in message, "the secret must not be echoed"
    WorkerSettings(webhook_secret=_b64(WEBHOOK_KEY_MIN_BYTES))     # the shortest accepted
