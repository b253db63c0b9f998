"""Completion webhooks from a live worker to a real local HTTP server: signed as Standard
Webhooks, retried on 5xx and timeouts, never following a redirect, sent for canceled jobs,
counted in the worker's metrics."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq.job import JobStatus

from ddpm.redis_server import free_port
from worker.client import cancel, enqueue, fetch_job
from worker.contract import GenerationSpec

SECRET = "whsec_" + base64.b64encode(b"sixteen byte key and more").decode()
KEY = b"sixteen byte key and more"
SLOW = {"model": "tiny", "steps": 1000, "sampler": "ddpm"}   # ~10 s on a 2-core CPU
ENV = {"DDPM_WEBHOOK_SECRET": SECRET, "DDPM_WEBHOOK_BACKOFF": "0.05",
       "DDPM_WEBHOOK_TIMEOUT": "0.5", "DDPM_WEBHOOK_ATTEMPTS": "3"}


class Receiver:
    """An HTTP server (its own threads) answering each path with a script of responses
    (status, or "hang" to answer after the worker's timeout); the last one repeats."""

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
                if step == "hang":
                    time.sleep(1.5)
                    step = 200
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


def verified(call: dict[str, Any]) -> dict[str, Any]:
    """The body, once its Standard Webhooks signature checks out (as a receiver does it)."""
    h = {k.lower(): v for k, v in call["headers"].items()}
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + call["body"]
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    versions = dict(s.split(",", 1) for s in h["webhook-signature"].split())
    assert hmac.compare_digest(versions["v1"], expected), h
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 300
    return json.loads(call["body"])


def metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_webhooks_are_signed_retried_never_redirected_and_counted(
        r, spawn_worker, wait_for, receiver: Receiver) -> None:
    elsewhere = Receiver("127.0.0.2")           # where a redirect points: another host
    try:
        receiver.scripts = {"/flaky": ["hang", 500, 200], "/moved": [(302, elsewhere.url + "/x")],
                            "/down": [503], "/ok": [200]}
        port = free_port()
        w = spawn_worker("--max-batch", "8", "--metrics-port", str(port), env=ENV)
        jobs = {path: enqueue(r, GenerationSpec(model="tiny", steps=2, seed=i),
                              webhook=receiver.url + path)
                for i, path in enumerate(["/flaky", "/moved", "/down", "/ok"])}
        for job in jobs.values():
            wait_for(lambda job=job: fetch_job(r, job.id).get_status() == JobStatus.FINISHED,
                     60, "the jobs", w)

        # 5xx and a timeout are retried (same webhook-id), each attempt signed.
        flaky = wait_for(lambda: len(receiver.to("/flaky")) >= 3 and receiver.to("/flaky"),
                         30, "three attempts at /flaky", w)
        ids = {c["headers"]["webhook-id"] for c in flaky}
        assert len(ids) == 1 and len(flaky) == 3, flaky
        for call in flaky:
            body = verified(call)
            assert body["type"] == "generation.succeeded" and body["status"] == "finished"
            assert body["job_id"] == jobs["/flaky"].id
        # A redirect is an answer, not followed and not retried.
        wait_for(lambda: metric(port, "ddpm_worker_webhook_deliveries_total",
                                outcome="rejected") == 1, 30, "the redirect rejected", w)
        assert len(receiver.to("/moved")) == 1 and not elsewhere.calls
        # Bounded attempts, then given up and counted.
        wait_for(lambda: metric(port, "ddpm_worker_webhook_deliveries_total",
                                outcome="gave_up") == 1, 30, "/down given up", w)
        assert len(receiver.to("/down")) == 3
        wait_for(lambda: metric(port, "ddpm_worker_webhook_deliveries_total",
                                outcome="delivered") == 2, 30, "/flaky and /ok delivered", w)
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="5xx") == 4
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="timeout") == 1
        assert metric(port, "ddpm_worker_webhook_attempts_total", result="3xx") == 1
        assert len(receiver.to("/ok")) == 1

        # A canceled job's webhook, with its reason.
        doomed = enqueue(r, GenerationSpec(**SLOW), webhook=receiver.url + "/canceled")
        wait_for(lambda: fetch_job(r, doomed.id).get_status() == JobStatus.STARTED, 60,
                 "the slow job to start", w)
        cancel(r, doomed.id)
        (call,) = wait_for(lambda: receiver.to("/canceled"), 30, "the canceled webhook", w)
        body = verified(call)
        assert body["type"] == "generation.canceled" and body["status"] == "canceled"
        assert body["job_id"] == doomed.id and body["error"] == "canceled"
    finally:
        elsewhere.close()
