"""The worker's one settings object (env prefix `DDPM_`), built once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contract import STREAM_MAX_BYTES, STREAM_MAXLEN


class WorkerSettings(BaseSettings):
    """Everything a worker process is configured by; CLI flags override the environment."""

    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    models_dir: Path = Path("checkpoints")
    models: list[str] = []          # serve only these names (empty: every model found)
    device: str = "auto"            # auto, cpu, cuda, cuda:N
    max_batch: Annotated[int, Field(ge=1, le=4096)] | None = None  # None: 128 on GPU, 16 on CPU
    name: str | None = None         # RQ worker name (default: random)
    # Throughput knobs (CUDA only; ignored on CPU).
    autocast_bf16: bool = True
    channels_last: bool = True
    # Liveness: heartbeats every `heartbeat_interval`; an execution unseen for
    # `execution_ttl` is abandoned and re-queued by a live worker's maintenance pass.
    heartbeat_interval: Annotated[float, Field(gt=0, le=60)] = 5.0
    execution_ttl: Annotated[int, Field(ge=3, le=3600)] = 20
    maintenance_interval: Annotated[int, Field(ge=1, le=3600)] = 15
    worker_ttl: Annotated[int, Field(ge=20, le=3600)] = 60
    # Results and events.
    result_ttl: Annotated[int, Field(ge=1)] = 24 * 3600   # images, streams, RQ results
    stream_maxlen: Annotated[int, Field(ge=10)] = STREAM_MAXLEN
    # Bytes of snapshot frames a job's stream keeps (oldest dropped first; the API's
    # setting of the same name refuses requests that would need more), and how long after a
    # job ends its frames are kept (its results stay `result_ttl`; a snapshot_ttl of
    # result_ttl or more leaves the frames to expire with the stream).
    stream_max_bytes: Annotated[int, Field(ge=1024)] = STREAM_MAX_BYTES
    snapshot_ttl: Annotated[int, Field(ge=1)] = 3600
    # The writer (worker/events.py): bytes of frames and events on their way to Redis before
    # snapshots are coalesced (half of it) and the step loop waits (all of it); threads
    # encoding frames (None: one per core, at most 4).
    writer_max_pending_bytes: Annotated[int, Field(ge=2**20)] = 64 * 2**20
    encode_threads: Annotated[int, Field(ge=1, le=64)] | None = None
    progress_interval: Annotated[float, Field(ge=0)] = 0.2   # seconds between progress events
    # Shutdown: on SIGTERM running jobs get this long to finish, then go back to the queue.
    grace_period: Annotated[float, Field(ge=0)] = 30.0
    # Prometheus metrics port (0: no metrics server) and the address it listens on
    # (`ddpm serve` passes its own --host, 127.0.0.1 by default).
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    metrics_host: Annotated[str, Field(min_length=1, max_length=255)] = "0.0.0.0"
    # Completion webhooks (worker/webhooks.py): signed with this secret (`whsec_<base64>`
    # or any string; unset: sent unsigned), each attempt given `webhook_timeout` seconds,
    # retried after `webhook_backoff` seconds doubling, `webhook_attempts` attempts at most.
    webhook_secret: Annotated[SecretStr, Field(min_length=16, max_length=1024)] | None = None
    webhook_timeout: Annotated[float, Field(gt=0, le=60)] = 10.0
    webhook_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    webhook_backoff: Annotated[float, Field(ge=0, le=3600)] = 2.0
    webhook_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    webhook_max_pending: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    log_level: str = "INFO"


def redacted(url: str) -> str:
    """`url` with its password masked: messages with it end up in logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
