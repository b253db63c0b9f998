"""`ddpm serve`: the all-in-one embedded default. An embedded Redis (unless DDPM_REDIS_URL
is set), one worker process, and the API in this process; Ctrl-C (or SIGTERM) stops the
API, then the worker (its jobs re-queued after a short grace), then Redis."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import uvicorn

from app.main import create_app
from app.settings import ApiSettings
from contract.workers import live_worker_keys
from worker.settings import redacted

from .processes import child_kwargs, stop
from .redis_server import RedisServer

log = logging.getLogger("ddpm.serve")

WORKER_START_TIMEOUT = 300.0      # loading checkpoints (first CUDA init can be slow)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path = Path("checkpoints")
    device: str = "auto"
    grace_period: float = 5.0     # seconds running jobs get to finish at Ctrl-C
    # The worker's Prometheus port: None is DEFAULT_METRICS_PORT when it is free (else
    # off, with a warning); a port given that is taken is an error; 0 is off.
    metrics_port: int | None = None


DEFAULT_METRICS_PORT = 9100       # the worker image's (docker/worker.Dockerfile)


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _has_checkpoints(models_dir: Path) -> bool:
    return (models_dir / "config.json").is_file() or any(models_dir.glob("*/config.json"))


def _metrics_port(opts: ServeOptions) -> int:
    """The worker's metrics port (0: off), checked free like the API's."""
    if opts.metrics_port is not None:
        if opts.metrics_port:
            _check_port(opts.host, opts.metrics_port)
        return opts.metrics_port
    try:
        _check_port(opts.host, DEFAULT_METRICS_PORT)
    except ValueError as e:
        print(f"ddpm serve: worker metrics off: {e} (choose one with --metrics-port)",
              file=sys.stderr, flush=True)
        return 0
    return DEFAULT_METRICS_PORT


def _start_worker(opts: ServeOptions, redis_url: str,
                  metrics_port: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DDPM_GRACE_PERIOD": os.environ.get(
        "DDPM_GRACE_PERIOD", str(opts.grace_period)), "DDPM_METRICS_HOST": opts.host}
    return subprocess.Popen(
        [sys.executable, "-m", "ddpm", "worker", "--redis-url", redis_url,
         "--models-dir", str(opts.models_dir), "--device", opts.device,
         "--metrics-port", str(metrics_port)],
        env=env, **child_kwargs())


def _wait_for_worker(client: redis.Redis, proc: subprocess.Popen[bytes]) -> list[str]:
    """The models the worker advertises once it is up; ValueError if it exits first."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ValueError(f"the worker exited with code {proc.returncode} (see above)")
        for key in live_worker_keys(client, time.time()):
            raw = client.get(key)
            if raw:
                return [m["name"] for m in json.loads(raw).get("models", [])]
        time.sleep(0.1)
    raise ValueError(f"the worker did not start within {WORKER_START_TIMEOUT:.0f} s")


def run_serve(opts: ServeOptions, settings: ApiSettings) -> int:
    if not _has_checkpoints(opts.models_dir):
        raise ValueError(f"no checkpoints in {opts.models_dir}/ (each model is a folder with "
                         "config.json and model.safetensors; `ddpm train` or `ddpm convert` "
                         "makes one)")
    _check_port(opts.host, opts.port)
    metrics_port = _metrics_port(opts)
    embedded = None if "DDPM_REDIS_URL" in os.environ else RedisServer()
    worker = None
    try:
        redis_url = embedded.start().url if embedded else settings.redis_url
        settings = settings.model_copy(update={"redis_url": redis_url})
        print(f"ddpm serve: redis at {redacted(redis_url)}"
              f"{' (embedded)' if embedded else ''}; starting a worker on {opts.device}",
              flush=True)
        worker = _start_worker(opts, redis_url, metrics_port)
        names = _wait_for_worker(redis.Redis.from_url(redis_url), worker)
        print(f"ddpm serve: serving {', '.join(names)} at http://{opts.host}:{opts.port}/ "
              f"(API docs: /docs). Ctrl-C stops everything.", flush=True)
        worker_metrics = (f"http://{opts.host}:{metrics_port}/metrics" if metrics_port
                          else "off (--metrics-port)")
        print(f"ddpm serve: metrics: API http://{opts.host}:{opts.port}/metrics, worker "
              f"{worker_metrics}", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=opts.host,
                                               port=opts.port, log_level="info",
                                               timeout_graceful_shutdown=5,
                                               **settings.proxy_options()))
        server.run()
        return 0
    finally:
        stop(worker, timeout=opts.grace_period + 15)
        if embedded:
            embedded.stop()
