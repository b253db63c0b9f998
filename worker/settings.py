"""The worker's one settings object (env prefix `DDPM_`), built once at start-up."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.limits import STREAM_MAX_BYTES, STREAM_MAXLEN
from contract.redis_connect import RedisSettingsFields
from contract.redis_connect import redacted as redacted  # re-exported: worker/main.py, ddpm
from contract.resume import RESUME_MAX_BYTES

# Webhook secrets take the Standard Webhooks form, `whsec_` + the base64 of the key, which
# its libraries (the `standardwebhooks` package among them) decode to sign and verify: a
# secret in any other form could not be verified with them, so a worker refuses it at start.
WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_KEY_MIN_BYTES = 24      # the spec's smallest key (192 bits)
WEBHOOK_SECRET_MAX_CHARS = 1024
MAKE_WEBHOOK_SECRET = ("python -c \"import base64,secrets;"
                       "print('whsec_'+base64.b64encode(secrets.token_bytes(32)).decode())\"")


def webhook_signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret, as the Standard Webhooks libraries decode
    it; ValueError saying what is wrong and how to make a good one (never the secret: it
    would end up in logs)."""
    how = f"make one with: {MAKE_WEBHOOK_SECRET}"
    if len(secret) > WEBHOOK_SECRET_MAX_CHARS:
        raise ValueError(f"DDPM_WEBHOOK_SECRET is {len(secret)} characters long; at most "
                         f"{WEBHOOK_SECRET_MAX_CHARS} are allowed ({how})")
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(
            f"DDPM_WEBHOOK_SECRET must be {WEBHOOK_SECRET_PREFIX!r} followed by the base64 of "
            f"a random key of {WEBHOOK_KEY_MIN_BYTES}+ bytes (the Standard Webhooks form, "
            f"which its libraries decode to verify); {how}. To keep signing with an older "
            f"secret's bytes, use {WEBHOOK_SECRET_PREFIX!r} + the base64 of its UTF-8 bytes")
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    try:            # strict: a character the libraries would skip is refused, not guessed
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"DDPM_WEBHOOK_SECRET's part after {WEBHOOK_SECRET_PREFIX!r} is not "
                         f"standard base64 (A-Z a-z 0-9 + / and = padding); {how}") from None
    if len(key) < WEBHOOK_KEY_MIN_BYTES:
        raise ValueError(f"DDPM_WEBHOOK_SECRET's key is {len(key)} bytes once base64-decoded; "
                         f"it needs at least {WEBHOOK_KEY_MIN_BYTES} ({how})")
    return key


# When a worker takes new jobs (`DDPM_ADMISSION`; bench/latency.py measures all three):
# step     between any two steps, while every admitted image fits a batch (continuous,
#          step-level batching: the default, and this project's reason to exist);
# request  only when the engine is empty, up to max_batch jobs at once, which then run to
#          completion together (request-level batching, as Triton, Ray Serve, BentoML do);
# none     no batching: max_batch is 1 (whatever DDPM_MAX_BATCH says), so one image at a
#          time, a job's images one after another, the next job when the last one ends.
Admission = Literal["step", "request", "none"]
ADMISSIONS: tuple[Admission, ...] = get_args(Admission)


class WorkerSettings(RedisSettingsFields, BaseSettings):
    """Everything a worker process is configured by; CLI flags override the environment."""

    # hide_input_in_errors: a refused value (the webhook secret among them) is never echoed
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore",
                                      hide_input_in_errors=True)

    # redis_url, redis_sentinels, redis_sentinel_master, redis_sentinel_password:
    # contract/redis_connect.py (RedisSettingsFields, the API's too).
    models_dir: Path = Path("checkpoints")
    models: list[str] = []          # serve only these names (empty: every model found)
    device: str = "auto"            # auto, cpu, cuda, cuda:N
    max_batch: Annotated[int, Field(ge=1, le=4096)] | None = None  # None: 128 on GPU, 16 on CPU
    admission: Admission = "step"   # when jobs are taken: see ADMISSIONS above
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
    # The CPU threads of the worker's torch ops (None: torch's default, one per core). On a
    # CPU that the API and Redis share (`ddpm serve` sets half the CPUs), fewer is cheaper: the
    # OpenMP threads a forward wakes spin between forwards while the loop does its host work,
    # burning the cores the API needs (BENCHMARKS §15: 1-image jobs 8.5 → 4.6 ms of worker CPU
    # per image on 2 cores, 1.3x the images/s).
    torch_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    progress_interval: Annotated[float, Field(ge=0)] = 0.2   # seconds between progress events
    # Shutdown: on SIGTERM running jobs get this long to finish, then go back to the queue.
    grace_period: Annotated[float, Field(ge=0)] = 30.0
    # Resume (worker/drain.py): a stopping worker writes each running job's exact sampler
    # state (contract/resume.py) and re-queues it, so whichever worker takes it next goes on
    # from there; only a job within `drain_finish_steps` network steps of done is left to
    # finish instead (2: finishing costs at most two steps, about what the state write, the
    # re-queue and a re-admission elsewhere cost; more would hold the exit for little).
    # A job whose state could exceed `resume_max_bytes` restarts from step 0, as before.
    # `resume_every` N > 0: every N steps the state of each job with more than N steps
    # left is written too (a checkpoint against SIGKILL); 0 (the default): none.
    resume_max_bytes: Annotated[int, Field(ge=0)] = RESUME_MAX_BYTES
    drain_finish_steps: Annotated[int, Field(ge=0)] = 2
    resume_every: Annotated[int, Field(ge=0)] = 0
    # Prometheus metrics port (0: no metrics server) and the address it listens on
    # (`ddpm serve` passes its own --host, 127.0.0.1 by default).
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    metrics_host: Annotated[str, Field(min_length=1, max_length=255)] = "0.0.0.0"
    # The same port serves /healthz and /readyz (worker/probes.py): /healthz fails when the
    # loop has not begun a pass for `stuck_after` seconds while Redis answers (a stuck step).
    stuck_after: Annotated[float, Field(gt=0, le=86400)] = 300.0
    # Completion webhooks (worker/webhooks.py): signed with this secret (`whsec_<base64>`,
    # checked by `webhook_signing_key`; unset: sent unsigned), each attempt given
    # `webhook_timeout` seconds, retried after `webhook_backoff` seconds doubling up to
    # `webhook_max_backoff`, `webhook_attempts` attempts at most.
    webhook_secret: SecretStr | None = None
    webhook_timeout: Annotated[float, Field(gt=0, le=60)] = 10.0
    webhook_attempts: Annotated[int, Field(ge=1, le=20)] = 6
    webhook_backoff: Annotated[float, Field(ge=0, le=3600)] = 2.0
    webhook_max_backoff: Annotated[float, Field(ge=0, le=24 * 3600)] = 3600.0
    webhook_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    webhook_max_pending: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    # Results in object storage (contract/results_store.py): `s3://bucket/prefix`; final
    # images and inputs go there, Redis keeps their URLs. None (the default): in Redis.
    # The store is reached as AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    # AWS_DEFAULT_REGION say (read by the library). An upload is retried this many seconds,
    # then its job fails ("result store unavailable: ...").
    results_url: str | None = None
    results_retry_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # Traces (contract/tracing.py): the OTLP/HTTP collector spans go to, e.g.
    # `http://collector:4318` (posted to its /v1/traces). None (the default): no tracing.
    # The SDK's OTEL_* variables (sampler, headers, batch delays) apply when set.
    otlp_endpoint: str | None = None
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _no_batching(self) -> WorkerSettings:
        """`admission=none` is `max_batch` 1 (see ADMISSIONS): the engine then needs no
        third rule, and the advertised max batch says what the worker does."""
        if self.admission == "none":
            self.max_batch = 1
        return self

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_form(cls, secret: SecretStr | None) -> SecretStr | None:
        """Refused at start rather than signing what no receiver's library can verify."""
        if secret is not None:
            webhook_signing_key(secret.get_secret_value())
        return secret

