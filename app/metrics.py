"""Prometheus metrics of the API: requests by route and status, latency, and (read from
Redis at scrape time, so every replica reports the same truth) queue depths, jobs by
status and live workers.

Several processes behind one port (`ddpm api --workers N`, or uvicorn/gunicorn workers with
`PROMETHEUS_MULTIPROC_DIR` set to an empty directory before they start): each process
writes its counters to files there and `/metrics`, whichever process answers, sums them
(prometheus-client's multiprocess mode); the open-streams gauge is the sum over live
processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.queueing import COUNTED
from contract.work import ModelWork

from .catalog import Catalog

log = logging.getLogger("ddpm.api")


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ApiMetrics:
    def __init__(self) -> None:
        # In multiprocess mode the values live in the directory's files; `registry` is then
        # what /metrics serves: every process's files, summed, and the Redis collector.
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = r = CollectorRegistry()
        own = None if self.multiprocess else r
        self.requests = Counter("ddpm_api_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=own)
        self.latency = Histogram(
            "ddpm_api_request_seconds", "Time to the response's first byte, by route",
            ["method", "route"], registry=own,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.generations = Counter("ddpm_api_generations_created",
                                   "Generations accepted, by model", ["model"], registry=own)
        self.streams = Gauge("ddpm_api_open_streams", "SSE and WebSocket streams open now "
                             "(summed over the API's processes)", registry=own,
                             multiprocess_mode="livesum")
        if self.multiprocess:
            multiprocess.MultiProcessCollector(r)

    def watch(self, catalog: Catalog) -> None:
        self.registry.register(RedisCollector(catalog))

    def close(self) -> None:
        """At the process's exit: its open-streams gauge no longer counts (its counters
        still do: a restarted process does not take back what the old one served)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


class RedisCollector(Collector):
    """Queue depth per queue, jobs by status, live workers, and the work signal per model
    (`ddpm_work_*`, contract/work.py: what `GET /v1/work` says): read when scraped (RQ's
    registries through `contract.queueing.queue_counts`)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("ddpm_queue_depth", "Jobs waiting, per queue", labels=["queue"])
        jobs = GaugeMetricFamily("ddpm_jobs", "Generation jobs by status (registries)",
                                 labels=["status"])
        workers = GaugeMetricFamily("ddpm_workers_live", "Workers advertising models")
        try:
            work = work_families(self.catalog.work(time.time()))
            totals = dict.fromkeys(COUNTED, 0)
            for name, counts in self.catalog.queue_counts().items():
                depth.add_metric([name], counts["queued"])
                for k, v in counts.items():
                    totals[k] += v
            for k, v in totals.items():
                jobs.add_metric([k], v)
            workers.add_metric([], len(self.catalog.live_workers()))
        except RedisError as e:
            log.warning("metrics: redis unreachable: %s", e)
            return []
        return [depth, jobs, workers, *work]


def work_families(models: dict[str, ModelWork]) -> list[GaugeMetricFamily]:
    """The work signal as gauges, one series per model (the rate's only once measured)."""
    queued = GaugeMetricFamily("ddpm_work_queued_image_steps",
                               "Image-steps of the jobs waiting in the model's queues",
                               labels=["model"])
    running = GaugeMetricFamily("ddpm_work_running_image_steps",
                                "Image-steps still to compute on the model's workers",
                                labels=["model"])
    seconds = GaugeMetricFamily("ddpm_work_seconds", "Worker-seconds of work waiting "
                                "(remaining image-steps / one worker's measured rate)",
                                labels=["model"])
    workers = GaugeMetricFamily("ddpm_work_workers", "Workers of the model: live, and ready "
                                "(loaded, not draining)", labels=["model", "state"])
    rate = GaugeMetricFamily("ddpm_work_image_steps_per_second",
                             "Image-steps one worker clears per second, measured",
                             labels=["model"])
    for name, w in models.items():
        queued.add_metric([name], w.queued_image_steps)
        running.add_metric([name], w.running_image_steps)
        seconds.add_metric([name], w.seconds_of_work)
        workers.add_metric([name, "live"], w.workers)
        workers.add_metric([name, "ready"], w.workers_ready)
        if w.image_steps_per_s is not None:
            rate.add_metric([name], w.image_steps_per_s)
    return [queued, running, seconds, workers, rate]


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template (bounded labels).

    A request is counted before its last body message is sent, so a client that has its
    answer finds it counted by any scrape after (counted after the send, a scrape in that
    gap missed it); one that never sends its last message (the client left, an error) is
    counted when the app returns."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if method not in _METHODS:
            method = "other"           # labels stay bounded whatever a client sends
        t0 = time.perf_counter()
        status = 500
        counted = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.requests.labels(method, _route_of(scope), str(status)).inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.latency.labels(method, _route_of(scope)).observe(
                    time.perf_counter() - t0)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            count()


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_of(scope: Scope) -> str:
    """The matched route's template (`/v1/generations/{job_id}`), never the raw path: the
    router records the route in the (shared) scope as it dispatches."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    # Starlette's own routes (FastAPI's /openapi.json, /docs, /redoc; mounts) do not record
    # themselves: find the one that matched, as the router did.
    app = scope.get("app")
    # A mount rewrites root_path as it dispatches; match from the app's own root.
    probe = {**scope, "root_path": scope.get("app_root_path", scope.get("root_path", ""))}
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = candidate.matches(probe)
        if match == Match.FULL:
            return getattr(candidate, "path", None) or "unmatched"
    return "unmatched"
