"""The worker's HTTP side: `/metrics` (its Prometheus registry), `/healthz` (liveness) and
`/readyz` (readiness), one small threaded server on `DDPM_METRICS_PORT`.

It starts before the models load (worker/main.py), so an orchestrator's startup probe on
`/readyz` answers 503 "loading" through a long load instead of connection refused, and no
probe needs to guess a load time. What the probes judge:

- `/readyz` 200 when the models are loaded, the last heartbeat to Redis succeeded within
  3 heartbeat intervals (its advertisement is then fresh: the API and the scaling signal
  count this worker), and the worker is not draining (SIGTERM: it takes no new jobs);
  else 503 with a JSON body naming each check that failed.
- `/healthz` 503 when the loop has not begun a pass within `DDPM_STUCK_AFTER` seconds while
  Redis answers its heartbeats: a stuck step, which only a restart cures. A Redis outage
  also halts the loop (it waits for Redis, upkeep.py), but a restart would not help there:
  that is readiness's business, so liveness does not judge the loop then.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

if TYPE_CHECKING:
    from .loop import BatchWorker
    from .settings import WorkerSettings

HEARTBEATS_FRESH = 3        # readiness: the last good heartbeat within this many intervals
PROBE_PATHS = ("/healthz", "/readyz")


class Health:
    """The two verdicts, read from the worker (attached once its models are loaded)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.heartbeat_window = HEARTBEATS_FRESH * settings.heartbeat_interval
        self.stuck_after = settings.stuck_after
        self.worker: BatchWorker | None = None

    def attach(self, worker: BatchWorker) -> None:
        """The models are loaded and the worker is built."""
        self.worker = worker

    def readiness(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """(ready, the body): every check with its state, the failed ones listed."""
        w = self.worker
        if w is None:
            return False, {"ready": False, "failed": ["models"], "models": "loading"}
        now = time.monotonic() if now is None else now
        checks: dict[str, str] = {"models": "loaded"}
        failed = []
        beat = w.upkeep.last_beat
        if beat is None:
            checks["heartbeat"] = "none yet"
            failed.append("heartbeat")
        elif now - beat > self.heartbeat_window:
            checks["heartbeat"] = f"last success {now - beat:.1f}s ago " \
                                  f"(> {self.heartbeat_window:g}s)"
            failed.append("heartbeat")
        else:
            checks["heartbeat"] = f"{now - beat:.1f}s ago"
        if w.stop_requested:
            checks["draining"] = "yes: no new jobs are taken"
            failed.append("draining")
        else:
            checks["draining"] = "no"
        return not failed, {"ready": not failed, "failed": failed, **checks}

    def liveness(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """(alive, the body): dead only when the loop is stuck while Redis answers."""
        w = self.worker
        if w is None:
            return True, {"live": True, "loop": "not started: models loading"}
        now = time.monotonic() if now is None else now
        since = now - w.last_pass
        beat = w.upkeep.last_beat
        redis_answers = beat is not None and now - beat <= self.heartbeat_window
        if since > self.stuck_after and redis_answers:
            return False, {"live": False, "loop": f"no pass for {since:.1f}s "
                           f"(> DDPM_STUCK_AFTER {self.stuck_after:g}s): a stuck step"}
        return True, {"live": True, "loop": f"last pass {since:.1f}s ago",
                      "redis": "answers" if redis_answers else "not answering"}


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True       # a hung probe client never holds the process at exit


class _IPv6Server(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no access log."""


def probes_app(registry: CollectorRegistry, health: Health) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: the two probes, and prometheus_client's metrics app at /metrics."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)     # type: ignore[no-any-return]
        if path not in PROBE_PATHS:     # a probe at a wrong path must fail, not get metrics
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics, /healthz, /readyz\n"]
        ok, body = health.readiness() if path == "/readyz" else health.liveness()
        data = json.dumps(body).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(data))), ("Cache-Control", "no-store")])
        return [data]

    return app


def serve_probes(registry: CollectorRegistry, health: Health, port: int,
                 host: str = "0.0.0.0") -> WSGIServer:
    """Listen on `host:port` from a daemon thread; `shutdown()` and `server_close()` stop
    it."""
    cls = _IPv6Server if ":" in host else _ThreadingServer
    server = make_server(host, port, probes_app(registry, health), server_class=cls,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="ddpm-probes", daemon=True).start()
    return server
