"""Traces across the queue, as a collector receives them: a real `ddpm api` and a real
`ddpm worker` export over OTLP/HTTP to a receiver in this test (an HTTP server decoding
each POST /v1/traces as OpenTelemetry's ExportTraceServiceRequest). One job's trace holds
the API's server and admission spans and the worker's queue, job, step, encode and write
spans, each under the right parent; step spans link to every job batched in them; the
worker's log lines, and its histograms' exemplars, name the trace. Off (the default),
nothing is sent, whatever the SDK's own variables say, and jobs run as before."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from ddpm.redis_server import free_port

JOB = {"model": "tiny", "steps": 60, "sampler": "ddpm", "num_images": 2}
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}    # ms between the SDK's exports


@dataclass(frozen=True)
class Received:
    """A span as the collector got it (ids as hex)."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    links: tuple[tuple[str, str], ...]      # (trace id, span id) of each link
    attributes: dict[str, Any]
    start: int
    end: int


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Collector:
    """An OTLP/HTTP trace receiver on a free port."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.posts = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    outer._take(ExportTraceServiceRequest.FromString(body))
                    reply, code = ExportTraceServiceResponse().SerializeToString(), 200
                else:
                    reply, code = b"", 404
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _take(self, req: ExportTraceServiceRequest) -> None:
        out = []
        for rs in req.resource_spans:
            service = next((_value(a.value) for a in rs.resource.attributes
                            if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(Received(
                        service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(),
                        s.parent_span_id.hex(),
                        tuple((k.trace_id.hex(), k.span_id.hex()) for k in s.links),
                        {a.key: _value(a.value) for a in s.attributes},
                        s.start_time_unix_nano, s.end_time_unix_nano))
        with self._lock:
            self.posts += 1
            self.spans.extend(out)

    def named(self, name: str, **attrs: Any) -> list[Received]:
        with self._lock:
            return [s for s in self.spans if s.name == name
                    and all(s.attributes.get(k) == v for k, v in attrs.items())]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def _until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


def _ready(client: httpx.Client) -> None:
    _until(lambda: client.get("/readyz").status_code == 200, 60, "a worker's advertisement")


def _succeeded(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        doc: dict[str, Any] = client.get(f"/v1/generations/{job_id}").json()
        assert doc["status"] not in ("failed", "canceled"), doc
        return doc if doc["status"] == "succeeded" else None
    return _until(done, 120, f"job {job_id} to succeed")  # type: ignore[no-any-return]


def _one(spans: list[Received], what: str) -> Received:
    assert len(spans) == 1, f"{what}: {len(spans)} spans {spans}"
    return spans[0]


def test_one_jobs_trace_crosses_api_queue_and_worker_whole(
        collector: Collector, start_api, spawn_worker, r) -> None:
    env = {"DDPM_OTLP_ENDPOINT": collector.url, **FAST_EXPORT}
    metrics_port = free_port()
    worker = spawn_worker("--max-batch", "8", "--metrics-port", str(metrics_port), env=env)
    api = start_api(env=env)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        _ready(client)
        first = client.post("/v1/generations", json={**JOB, "seed": 1})
        second = client.post("/v1/generations", json={**JOB, "seed": 2})
        assert first.status_code == second.status_code == 202, (first.text, second.text)
        a, b = first.json()["id"], second.json()["id"]
        docs = {a: _succeeded(client, a), b: _succeeded(client, b)}
    # A job span ends with its job, after its write: both there means both traces are whole.
    _until(lambda: all(collector.named("job", **{"ddpm.job_id": j}) for j in (a, b)), 30,
           f"both job spans\n--- worker log ---\n{worker.log()[-3000:]}")
    _until(lambda: all(collector.named("admission", **{"ddpm.job_id": j}) for j in (a, b)),
           30, "both admission spans")

    jobs = {}
    for job_id in (a, b):
        admission = _one(collector.named("admission", **{"ddpm.job_id": job_id}), "admission")
        tid = admission.trace_id
        spans = [s for s in collector.spans if s.trace_id == tid]
        by_name: dict[str, list[Received]] = {}
        for s in spans:
            by_name.setdefault(s.name, []).append(s)
        queue = _one(by_name["queue"], "queue span")
        job = _one(by_name["job"], "job span")
        # The API's spans (FastAPI's server span, its operations, our admission), from the
        # API; the worker's, from the worker: one trace.
        api_spans = {s.span_id: s for s in spans if s.service == "ddpm-api"}
        server = _one([s for s in api_spans.values() if s.kind == SpanProto.SPAN_KIND_SERVER],
                      "server span")
        assert server.name == "POST /v1/generations" and server.parent == ""
        up, chain = admission, []
        while up.parent in api_spans:           # the admission span is under the POST's
            up = api_spans[up.parent]
            chain.append(up.name)
        assert up is server, (chain, spans)
        assert {s.service for s in spans if s.span_id not in api_spans} == {"ddpm-worker"}
        assert {"queue", "job", "encode", "write"} <= {s.name for s in spans
                                                      if s.service == "ddpm-worker"}
        # Queue wait, then the job: both children of the admission that enqueued it.
        assert queue.parent == admission.span_id, (queue, admission)
        assert job.parent == admission.span_id, (job, admission)
        assert queue.end == job.start and queue.start <= queue.end
        assert job.attributes["ddpm.job_id"] == job_id
        assert job.attributes["ddpm.outcome"] == "succeeded"
        # Each final image's encode, and the result write, under the job.
        encodes = by_name.get("encode", [])
        assert sorted(s.attributes["ddpm.image"] for s in encodes) == [0, 1], encodes
        assert {s.parent for s in encodes} == {job.span_id}
        writes = by_name.get("write", [])
        assert writes and {s.parent for s in writes} == {job.span_id}, writes
        assert sum(s.attributes["ddpm.images"] for s in writes) == JOB["num_images"]
        # Steps of this trace are children of this job's span (the oldest in their batch).
        assert {s.parent for s in by_name.get("step", [])} <= {job.span_id}
        jobs[job_id] = job
        # From a slow job to its trace: the API reports the trace id.
        assert docs[job_id]["trace_id"] == tid
        # The worker's log lines of this job name its trace.
        assert f"job {job_id} started" in worker.log()
        started = [ln for ln in worker.log().splitlines() if f"job {job_id} started" in ln]
        assert started and f"trace_id={tid}" in started[0], started

    steps = collector.named("step")
    assert steps and all(s.attributes["ddpm.model"] == "tiny" for s in steps)
    # The first job taken is the oldest in every step it shares: its trace holds them.
    ja, jb = jobs[a], jobs[b]
    assert any(s.parent == ja.span_id for s in steps)
    for s in steps:
        assert s.parent in (ja.span_id, jb.span_id)
        # Linked to the job span of every job in its batch, its parent's first.
        assert s.attributes["ddpm.job_count"] == len(s.links) >= 1, s
        assert (s.trace_id, s.parent) in s.links
        assert s.attributes["ddpm.batch_size"] >= 2 * len(s.links) - 2
    shared = [s for s in steps if set(s.links) == {(ja.trace_id, ja.span_id),
                                                   (jb.trace_id, jb.span_id)}]
    assert shared, "no step linked to both jobs' spans (were they batched together?)"
    assert all(s.parent == ja.span_id and s.attributes["ddpm.batch_size"] == 4
               for s in shared)
    # The job's RQ meta carries the context the worker continued from (W3C traceparent).
    carrier = json.loads(r.hget(f"rq:job:{a}", "meta"))["trace"]
    assert carrier["traceparent"].split("-")[1] == ja.trace_id

    # Exemplars: the queue-wait and duration histograms point at the jobs' traces.
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics",
                     headers={"Accept": "application/openmetrics-text"}, timeout=10).text
    exemplars: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplars.setdefault(family.name, set()).add(sample.exemplar.labels["trace_id"])
    traces = {ja.trace_id, jb.trace_id}
    assert exemplars.get("ddpm_worker_queue_wait_seconds", set()) & traces, exemplars
    assert exemplars.get("ddpm_worker_job_duration_seconds", set()) & traces, exemplars


def test_off_by_default_nothing_is_sent_and_jobs_run(
        collector: Collector, start_api, spawn_worker, r) -> None:
    # The SDK's own variables name the collector: without DDPM_OTLP_ENDPOINT they turn
    # nothing on.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.url}/v1/traces", **FAST_EXPORT}
    worker = spawn_worker("--max-batch", "8", env=env)
    api = start_api(env=env)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        _ready(client)
        sub = client.post("/v1/generations", json={**JOB, "seed": 3})
        assert sub.status_code == 202, sub.text
        job_id = sub.json()["id"]
        doc = _succeeded(client, job_id)
        assert len(doc["images"]) == JOB["num_images"] and doc["trace_id"] is None
        assert client.get(doc["images"][0]).content.startswith(b"\x89PNG")
    time.sleep(1.0)         # ten export intervals: anything buffered would be out by now
    assert collector.posts == 0 and collector.spans == []
    assert b'"trace"' not in (r.hget(f"rq:job:{job_id}", "meta") or b"")
    assert "trace_id=" not in worker.log()
