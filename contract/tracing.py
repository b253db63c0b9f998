"""Traces across the queue (OpenTelemetry): off by default, on when a setting names an
OTLP/HTTP endpoint (`DDPM_OTLP_ENDPOINT`, e.g. `http://collector:4318`).

Off, nothing is set up: `tracer()` is OpenTelemetry's global one (a no-op unless the
embedding process installed a provider), `enabled()` is False and the worker's step loop
pays one boolean per pass. On, this process gets a `TracerProvider` whose resource names
the service (`ddpm-api`, `ddpm-worker`; `OTEL_SERVICE_NAME` overrides), a
`BatchSpanProcessor` and an `OTLPSpanExporter` posting to `{endpoint}/v1/traces`; the
SDK's own variables keep working (`OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_BSP_SCHEDULE_DELAY`, ...). `shutdown()` flushes what is buffered (process exit).

The job carries the W3C trace context (`traceparent`, `tracestate`) in its RQ meta under
META_FIELD: the API injects it inside its admission span, the worker extracts it when it
takes the job. What the worker then records (ARCHITECTURE.md, "Traces"):

    queue   enqueued → taken, a child of the API's admission span
    job     taken → ended (its outcome), a sibling of `queue`
    step    one per batched forward of a model: a child of the oldest job's `job` span,
            linked to the `job` span of every job in the batch
    encode, write   a final image's PNG encode and the result write, under `job`
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

__all__ = ["API_SERVICE", "META_FIELD", "WORKER_SERVICE", "Span", "SpanKind", "child",
           "enabled", "end_job", "exemplar", "extract", "inject", "setup", "shutdown",
           "start_job", "step_span", "trace_id", "trace_id_of", "tracer"]

API_SERVICE = "ddpm-api"
WORKER_SERVICE = "ddpm-worker"
META_FIELD = "trace"            # the RQ job meta entry holding the W3C carrier
TRACER_NAME = "ddpm"

_provider: TracerProvider | None = None


def setup(service: str, endpoint: str | None) -> bool:
    """Export this process's spans to `endpoint` (OTLP/HTTP); None or empty: nothing is set
    up. Once per process (a second call keeps the first provider). Whether tracing is on."""
    global _provider
    if not endpoint:
        return _provider is not None
    if _provider is not None:
        return True
    # Imported only when on: the exporter pulls in requests and protobuf.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}),
                              shutdown_on_exit=True)
    exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)     # the global, for libraries that trace too
    _provider = provider
    return True


def enabled() -> bool:
    """Whether `setup` turned tracing on here: the one guard of per-step work."""
    return _provider is not None


def shutdown() -> None:
    """Send what is buffered and stop exporting (idempotent; spans after it are dropped)."""
    if _provider is not None:
        _provider.shutdown()


def tracer() -> Tracer:
    """This process's tracer: ours when on, else the global (a no-op unless installed)."""
    if _provider is not None:
        return _provider.get_tracer(TRACER_NAME)
    return trace.get_tracer(TRACER_NAME)


def inject(context: Context | None = None) -> dict[str, str]:
    """The W3C carrier (`traceparent`, `tracestate`) of `context` (the current one when
    None); empty when no span is recording."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The context a carrier made by `inject` stands for (an empty one for anything else)."""
    if not isinstance(carrier, Mapping):
        return Context()
    return propagate.extract({str(k): str(v) for k, v in carrier.items()})


def trace_id(span: Span | None) -> str | None:
    """The span's trace id as 32 hex digits (what Tempo and Jaeger search by), or None."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None


def trace_id_of(carrier: object) -> str | None:
    """The trace id of a stored carrier (a job's meta entry), or None."""
    if not isinstance(carrier, Mapping):
        return None
    ctx = trace.get_current_span(extract(carrier)).get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None


def exemplar(span: Span | None) -> dict[str, str] | None:
    """A Prometheus exemplar pointing at the span's trace (None when not traced)."""
    tid = trace_id(span) if span is not None and span.is_recording() else None
    return {"trace_id": tid} if tid is not None else None


# -- the worker's spans ---------------------------------------------------------------------

def start_job(carrier: Mapping[str, str] | None, *, enqueued_ns: int, taken_ns: int,
              attributes: Mapping[str, str | int]) -> Span:
    """A taken job: its `queue` span (enqueued → taken, ended here) and its `job` span
    (started at `taken_ns`, ended by `end_job`), both children of the context the API
    injected (a trace of its own when the job carries none)."""
    parent = extract(carrier)
    t = tracer()
    queue = t.start_span("queue", context=parent, kind=SpanKind.CONSUMER,
                         start_time=enqueued_ns, attributes=attributes)
    queue.end(end_time=taken_ns)
    return t.start_span("job", context=parent, kind=SpanKind.CONSUMER,
                        start_time=taken_ns, attributes=attributes)


def end_job(span: Span | None, outcome: str, error: str | None = None) -> None:
    """End a job's span with its outcome (succeeded, failed, requeued, ...)."""
    if span is None:
        return
    span.set_attribute("ddpm.outcome", outcome)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def step_span(model: str, slots: int, jobs: Sequence[Span], *, start_ns: int,
              end_ns: int) -> None:
    """One batched step of `model` over `slots` slots of `jobs`' images (oldest job first):
    OpenTelemetry's batch-processing shape, one span per batch, a child of the first job's
    span and linked to every job's span, so each job's trace reaches the steps it shared.
    Jobs a sampler left out (spans not recording) take no part: with
    `OTEL_TRACES_SAMPLER=parentbased_*` a traced job's steps hang under the oldest traced
    job, and a batch of untraced jobs costs no span."""
    jobs = [s for s in jobs if s.is_recording()]
    if not jobs:
        return
    parent = trace.set_span_in_context(jobs[0])
    links = [Link(s.get_span_context()) for s in jobs]
    span = tracer().start_span("step", context=parent, links=links, start_time=start_ns,
                               attributes={"ddpm.model": model, "ddpm.batch_size": slots,
                                           "ddpm.job_count": len(jobs)})
    span.end(end_time=end_ns)


@contextmanager
def child(name: str, parent: Span | None,
          attributes: Mapping[str, str | int] | None = None) -> Iterator[None]:
    """A span under `parent` (a job's span) around the block; nothing when None. For work
    on another thread than the one that made `parent`: the context is passed, not current."""
    if parent is None:
        yield
        return
    span = tracer().start_span(name, context=trace.set_span_in_context(parent),
                               attributes=attributes)
    try:
        yield
    except BaseException as e:
        span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
        raise
    finally:
        span.end()
