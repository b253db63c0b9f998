"""`ddpm worker`: build the settings, load the models, run the batching RQ worker."""

from __future__ import annotations

import logging

import torch
from redis.exceptions import RedisError

from contract import tracing
from contract.redis_connect import connect
from contract.results_store import ResultStore
from models import resolve_device

from .catalog import load_models
from .engine import Engine
from .loop import BatchWorker
from .metrics import WorkerMetrics
from .probes import Health, serve_probes
from .settings import WorkerSettings, redacted

log = logging.getLogger("ddpm.worker")


def build_worker(settings: WorkerSettings) -> BatchWorker:
    """Connect, load the models and assemble the worker (ValueError/FileNotFoundError with a
    message on bad settings). The metrics port's server (metrics and probes) starts first,
    so /readyz answers 503 "loading" while the models load."""
    metrics, health = WorkerMetrics(), Health(settings)
    probes = (serve_probes(metrics.registry, health, settings.metrics_port,
                           settings.metrics_host) if settings.metrics_port else None)
    try:
        worker = _build(settings, metrics)
    except BaseException:
        if probes is not None:
            probes.shutdown()
            probes.server_close()
        raise
    health.attach(worker)
    return worker


def _build(settings: WorkerSettings, metrics: WorkerMetrics) -> BatchWorker:
    use_torch_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    target = settings.redis_target()          # a URL, or Sentinel (contract/redis_connect.py)
    redis = connect(target)
    try:
        redis.ping()
    except RedisError as e:
        raise ValueError(f"cannot reach Redis at {target.describe()}: {e}") from None
    catalog = load_models(settings.models_dir, device, settings.models or None)
    if not catalog.names:
        raise ValueError(f"no checkpoints found in {settings.models_dir}")
    settings.check_models_here(catalog.names)    # DDPM_REDIS_MODELS: none of ours elsewhere
    max_batch = settings.max_batch or (128 if device.type == "cuda" else 16)

    def on_oom(model: str, chunk: int) -> None:
        metrics.oom.labels(model).inc()
        log.warning("out of memory on %s: forward now in chunks of %d", model, chunk)

    engine = Engine(catalog.loaded, device=device, max_batch=max_batch,
                    bf16=settings.autocast_bf16, channels_last=settings.channels_last,
                    on_oom=on_oom)
    worker = BatchWorker(settings, redis, catalog, engine, metrics)
    if settings.results_url:        # final images and inputs to object storage
        worker.writer.use_store(ResultStore(settings.results_url,
                                            retry_for=settings.results_retry_s))
        log.info("results to %s", settings.results_url)
    return worker


def use_torch_threads(n: int | None) -> None:
    """torch's intra-op CPU threads for this process (None: leave torch's default)."""
    if n is not None:
        torch.set_num_threads(n)


def run_worker(settings: WorkerSettings, *, burst: bool = False) -> int:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if tracing.setup(tracing.WORKER_SERVICE, settings.otlp_endpoint):  # before the worker
        log.info("tracing on: spans to %s", redacted(settings.otlp_endpoint or ""))
    worker = build_worker(settings)
    log.info("worker %s serving %s on %s (max batch %d, %d CPU threads)", worker.name,
             ", ".join(worker.catalog.names), worker.engine.device, worker.engine.max_batch,
             torch.get_num_threads())
    try:
        worker.work(burst=burst)
    finally:
        tracing.shutdown()          # the spans still buffered go out
    return 0
