"""Completion webhooks, signed as Standard Webhooks (and Stripe-like receivers) expect, from
their own threads: never on the step loop, never following a redirect, retried with backoff.

A job's webhook URL is stored on its RQ job (`contract.queueing.enqueue`; the API checks the
host against DDPM_WEBHOOK_ALLOW_HOSTS). When the job ends (succeeded, failed for good, or
canceled: by the API, `rq`, or RQ's stop commands) the worker POSTs JSON to it:

    {"type": "generation.succeeded" | "generation.failed" | "generation.canceled",
     "job_id", "status": "finished" | "failed" | "canceled", "enqueued_at", "ended_at",
     "error" (why it failed or was canceled; null when it succeeded)}

with the headers `webhook-id` (the same for every attempt of one delivery: receivers
de-duplicate on it), `webhook-timestamp` (Unix seconds of this attempt) and, when
DDPM_WEBHOOK_SECRET is set, `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed with the base64-decoded part of the secret
`whsec_<base64>` as the Standard Webhooks libraries decode it (any other form is refused at
start: `settings.webhook_signing_key`).

An attempt that times out, cannot connect, or gets a 5xx, 408 or 429 (the receiver is
down, slow or busy: worth another try) is retried after `retry_delay`: `webhook_backoff`
seconds, doubling each time, at most `webhook_max_backoff`, up to `webhook_attempts`
attempts, then given up; any other answer ends the delivery (2xx delivered; 3xx, never
followed, and any other 4xx rejected: the same request would be refused again).
`ddpm_worker_webhook_deliveries_total{outcome}` counts each delivery's end
(delivered, rejected, gave_up, dropped: over `webhook_max_pending` or unfinished at exit)
and `ddpm_worker_webhook_attempts_total{result}` each attempt.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from .metrics import WorkerMetrics
from .settings import WorkerSettings, webhook_signing_key

log = logging.getLogger("ddpm.worker.webhooks")

EVENT_TYPES = {"finished": "generation.succeeded", "failed": "generation.failed",
               "canceled": "generation.canceled"}
RETRY_STATUS = frozenset({408, 429})     # 4xx worth another attempt (and every 5xx)


def retry_delay(settings: WorkerSettings, attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, …): the backoff,
    doubled after each attempt, capped."""
    return min(settings.webhook_backoff * 2 ** (attempt - 1), settings.webhook_max_backoff)


def retried(status: int) -> bool:
    """Whether an answer with HTTP `status` is tried again (5xx, 408, 429)."""
    return status >= 500 or status in RETRY_STATUS


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value for one attempt."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@dataclass
class Delivery:
    url: str
    msg_id: str
    body: bytes
    job_id: str
    attempt: int = 0            # attempts made so far


class WebhookSender:
    """Deliveries of one worker: a scheduler thread and a few sending threads."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        secret = settings.webhook_secret
        self._key = webhook_signing_key(secret.get_secret_value()) if secret else None
        self._due: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._busy = 0              # attempts running now
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=settings.webhook_concurrency,
                                        thread_name_prefix="ddpm-webhook")
        self._thread = threading.Thread(target=self._schedule, name="ddpm-webhooks",
                                        daemon=True)
        self._thread.start()

    # -- what the worker calls --------------------------------------------------------

    def send(self, job_id: str, status: str, urls: list[str], *,
             enqueued_at: datetime | None, ended_at: datetime | None,
             error: str | None = None) -> None:
        """Queue a job's webhooks (`urls`, each once) for `status` (finished, failed,
        canceled). Cheap: no I/O on the caller's thread."""
        if not urls:
            return
        payload: dict[str, Any] = {
            "type": EVENT_TYPES[status], "job_id": job_id, "status": status,
            "enqueued_at": enqueued_at.isoformat() if enqueued_at else None,
            "ended_at": (ended_at or datetime.now(UTC)).isoformat(),
            "error": None if status == "finished" else error}
        body = json.dumps(payload).encode()
        for i, url in enumerate(urls):
            suffix = f"_{i}" if i else ""
            self._push(Delivery(url, f"msg_{job_id}_{status}{suffix}", body, job_id), 0.0)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking deliveries; wait up to `timeout` for the queued ones, then drop what
        is left (counted)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while (self._due or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            for _, _, d in self._due:
                self._end(d, "dropped", "worker stopping")
            self._due.clear()
            self._cond.notify_all()
        self._thread.join(timeout=1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- scheduling ---------------------------------------------------------------------

    def _push(self, d: Delivery, delay: float) -> None:
        with self._cond:
            if len(self._due) + self._busy >= self.settings.webhook_max_pending:
                self._end(d, "dropped", "too many pending deliveries")
                return
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), d))
            self._cond.notify_all()

    def _schedule(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed and not self._due:
                        return
                    if self._due and self._due[0][0] <= time.monotonic():
                        _, _, d = heapq.heappop(self._due)
                        self._busy += 1
                        break
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(wait)
            try:
                self._pool.submit(self._attempt, d)
            except RuntimeError:          # the pool is shut down: the worker is exiting
                with self._cond:
                    self._busy -= 1
                    self._end(d, "dropped", "worker stopping")
                return

    def _attempt(self, d: Delivery) -> None:
        try:
            d.attempt += 1
            result, retry, detail = self._post(d)
            self.metrics.webhook_attempts.labels(result).inc()
            if result == "2xx":
                self._end(d, "delivered", detail)
            elif not retry:
                self._end(d, "rejected", detail)
            elif d.attempt >= self.settings.webhook_attempts:
                self._end(d, "gave_up", detail)
            else:
                delay = retry_delay(self.settings, d.attempt)
                log.info("webhook %s for job %s: %s; attempt %d in %rs", _host(d.url),
                         d.job_id, detail, d.attempt + 1, delay)
                with self._cond:
                    heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), d))
        except Exception:   # a sending thread must outlive any one delivery
            log.exception("webhook for job %s", d.job_id)
            self._end(d, "gave_up", "internal error")
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def _end(self, d: Delivery, outcome: str, detail: str) -> None:
        self.metrics.webhook_deliveries.labels(outcome).inc()
        level = logging.DEBUG if outcome == "delivered" else logging.WARNING
        log.log(level, "webhook %s for job %s %s after %d attempt(s): %s", _host(d.url),
                d.job_id, outcome.replace("_", " "), d.attempt, detail)

    # -- one attempt ----------------------------------------------------------------------

    def _post(self, d: Delivery) -> tuple[str, bool, str]:
        """(result label, retry?, detail). One request; a redirect is an answer like any
        other, never followed."""
        parts = urlsplit(d.url)
        timeout = self.settings.webhook_timeout
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                               timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "ddpm-serve-webhooks",
                   "webhook-id": d.msg_id, "webhook-timestamp": str(ts)}
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, d.msg_id, ts, d.body)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("POST", path, body=d.body, headers=headers)
            resp = conn.getresponse()
            resp.read(64 * 1024)
            status = resp.status
            where = resp.getheader("Location")
        except TimeoutError:
            return "timeout", True, f"no answer within {timeout:g}s"
        except (OSError, http.client.HTTPException) as e:
            return "error", True, f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        label = f"{status // 100}xx" if 200 <= status < 600 else "error"
        if 200 <= status < 300:
            return label, False, f"HTTP {status}"
        if 300 <= status < 400:
            return label, False, f"HTTP {status} redirect to {where!r} not followed"
        return label, retried(status), f"HTTP {status}"


def _host(url: str) -> str:
    return urlsplit(url).netloc
