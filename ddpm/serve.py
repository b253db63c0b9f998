"""`ddpm serve`: the all-in-one embedded default. An embedded Redis (unless DDPM_REDIS_URL
is set), one worker process, and the API in this process; Ctrl-C (or SIGTERM) stops the
API, then the worker (its jobs re-queued after a short grace), then Redis.

The embedded Redis keeps an append-only file in a data directory (`--data-dir`,
DDPM_SERVE_DATA_DIR; default `$XDG_STATE_HOME/ddpm-serve/redis`), so that a restart
answers every job as before and runs the queued and re-queued ones; `--ephemeral` is
the old throwaway Redis (tests, benchmarks). One `ddpm serve` per data directory."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import uvicorn
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.main import create_app
from app.settings import ApiSettings
from contract.redis_connect import connect, redacted
from contract.workers import live_worker_keys

from .processes import child_kwargs, stop
from .redis_server import APPENDFSYNC, DataDirInUse, RedisServer

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
    # Where the embedded Redis keeps its append-only file; None: a throwaway Redis in a
    # temporary directory (`--ephemeral`).
    data_dir: Path | None = None


class ServeSettings(BaseSettings):
    """`ddpm serve`'s own settings (the API's are ApiSettings, the worker's
    WorkerSettings); its flags override them."""

    model_config = SettingsConfigDict(env_prefix="DDPM_SERVE_", extra="ignore",
                                      env_ignore_empty=True)   # DDPM_SERVE_DATA_DIR= : unset

    data_dir: Path | None = None      # None: default_data_dir()
    ephemeral: bool = False


def default_data_dir() -> Path:
    """`$XDG_STATE_HOME/ddpm-serve/redis` (`~/.local/state/...` without it): the XDG
    place for state an application reuses at its next start, whatever the directory
    `ddpm serve` is started from. (`make run` puts it under the checkout instead.)"""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ddpm-serve" / "redis"


def data_dir_of(flag: Path | None, ephemeral: bool, settings: ServeSettings) -> Path | None:
    """The embedded Redis's data directory: the flag, else DDPM_SERVE_DATA_DIR, else the
    default; None when ephemeral (flag or DDPM_SERVE_EPHEMERAL)."""
    if ephemeral or (settings.ephemeral and flag is None):
        return None
    return (flag or settings.data_dir or default_data_dir()).expanduser()


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


def worker_torch_threads() -> str:
    """The worker's DDPM_TORCH_THREADS here: as set, else half the CPUs this process may use
    (at least 1), the rest left to the API and Redis on the same machine (torch's own
    default, one per physical core, is the same count where a core runs two threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return os.environ.get("DDPM_TORCH_THREADS") or str(max(1, (cores or 1) // 2))


def _start_worker(opts: ServeOptions, redis_url: str,
                  metrics_port: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DDPM_GRACE_PERIOD": os.environ.get(
        "DDPM_GRACE_PERIOD", str(opts.grace_period)), "DDPM_METRICS_HOST": opts.host,
        "DDPM_TORCH_THREADS": worker_torch_threads()}
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


def _embedded_redis(data_dir: Path | None) -> RedisServer:
    if data_dir is None:
        return RedisServer()
    return RedisServer(appendonly=True, appendfsync=APPENDFSYNC, data_dir=data_dir)


def _start_redis(embedded: RedisServer) -> str:
    try:
        return embedded.start().url
    except DataDirInUse as e:
        raise ValueError(f"{e}: one ddpm serve per data directory; stop that one, or give "
                         "this one another with --data-dir (or --ephemeral)") from None
    except OSError as e:      # the directory cannot be made or its lock file opened
        raise ValueError(f"cannot use the data directory {embedded.data_dir}: {e.strerror}"
                         " (choose another with --data-dir, or --ephemeral)") from None
    except RuntimeError as e:     # e.g. an AOF it cannot read: its log's last lines say
        raise ValueError(f"the embedded {e}") from None


def _where(embedded: RedisServer | None) -> str:
    if embedded is None:
        return ""
    if embedded.appendonly:
        return f" (embedded), its data in {embedded.data_dir}"
    return " (embedded), ephemeral"


def run_serve(opts: ServeOptions, settings: ApiSettings) -> int:
    if not _has_checkpoints(opts.models_dir):
        raise ValueError(f"no checkpoints in {opts.models_dir}/ (each model is a folder with "
                         "config.json and model.safetensors; `ddpm train` or `ddpm convert` "
                         "makes one)")
    _check_port(opts.host, opts.port)
    metrics_port = _metrics_port(opts)
    external = "DDPM_REDIS_URL" in os.environ or settings.redis_sentinels   # else embedded
    embedded = None if external else _embedded_redis(opts.data_dir)
    worker = None
    try:
        redis_url = _start_redis(embedded) if embedded else settings.redis_url
        settings = settings.model_copy(update={"redis_url": redis_url})
        where = settings.redis_target().describe() if embedded is None else redacted(redis_url)
        print(f"ddpm serve: redis at {where}{_where(embedded)}; "
              f"starting a worker on {opts.device}", flush=True)
        worker = _start_worker(opts, redis_url, metrics_port)
        names = _wait_for_worker(connect(settings.redis_target()), worker)
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
        _stop_in_order(worker, embedded, _grace_period(opts))


def _grace_period(opts: ServeOptions) -> float:
    """The worker's DDPM_GRACE_PERIOD (what it drains for), else serve's default."""
    try:
        return float(os.environ.get("DDPM_GRACE_PERIOD", opts.grace_period))
    except ValueError:
        return opts.grace_period       # the worker refuses it at start


def _stop_in_order(worker: subprocess.Popen[bytes] | None, embedded: RedisServer | None,
                   grace: float) -> None:
    """The worker first (it re-queues its running jobs into Redis), then Redis (its AOF
    written). A second Ctrl-C (or SIGTERM) meanwhile hurries the worker — its second stop
    signal re-queues at once — instead of killing serve, whose children would then get
    their parent-death SIGTERM together: Redis gone before the worker's last writes."""
    def hurry(signum: int, frame: object) -> None:
        if worker is not None and worker.poll() is None:
            print("ddpm serve: stopping now: the worker re-queues its running jobs",
                  file=sys.stderr, flush=True)
            worker.terminate()

    previous = {sig: signal.signal(sig, hurry) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if worker is not None and worker.poll() is None:
            print(f"ddpm serve: stopping the worker: running jobs get {grace:g} s to finish, "
                  "then go back to the queue (Ctrl-C again: at once)",
                  file=sys.stderr, flush=True)
        stop(worker, timeout=grace + 15)
        if embedded:
            embedded.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
