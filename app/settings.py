"""The API's one settings object (env prefix `DDPM_`), built once at start-up."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contract.limits import STREAM_MAX_BYTES, STREAM_MAXLEN
from contract.redis_connect import RedisSettingsFields, env_list

_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?")


class ApiSettings(RedisSettingsFields, BaseSettings):
    """Everything the API process is configured by; CLI flags override the environment."""

    # Errors never echo a value: api_keys or a redis_url with a password would reach the log.
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore",
                                      hide_input_in_errors=True)

    # redis_url, redis_sentinels, redis_sentinel_master, redis_sentinel_password:
    # contract/redis_connect.py (RedisSettingsFields, the worker's too).
    # Before a 202, wait until this many replicas have the job (Redis WAIT), at most
    # `redis_wait_timeout_ms`; fewer: 503 (the job may still exist: retry with the same
    # Idempotency-Key). 0 (the default): no wait, a 202 as soon as the primary has the job.
    redis_wait_replicas: Annotated[int, Field(ge=0, le=16)] = 0
    redis_wait_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 1000
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    # Access: SHA-256 hex digests of the accepted API keys (`ddpm api-key` makes one).
    # Empty: the service is open and says so at start-up.
    api_keys: Annotated[list[str], NoDecode] = []
    # Back-pressure: 429 when a model's queues hold this many jobs, or a key (or, when open,
    # a client address) submits more than `rate_limit` generations per `rate_window` seconds.
    max_queue_depth: Annotated[int, Field(ge=1)] = 1000
    retry_after: Annotated[int, Field(ge=1, le=3600)] = 5
    rate_limit: Annotated[int, Field(ge=0)] = 120        # 0: no rate limit
    rate_window: Annotated[int, Field(ge=1, le=86400)] = 60
    # Completion webhooks only to these hosts (exact names, or `.example.com` for a domain
    # and its subdomains). Empty: webhooks are refused.
    webhook_allow_hosts: Annotated[list[str], NoDecode] = []
    # A POST checks the model against what live workers advertise, as read at most this
    # many seconds ago (a model missing from that read is looked up again at once). 0: read
    # on every POST.
    models_cache_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # Scale to zero: accept jobs for a model no live worker serves now but one served within
    # contract.workers.KNOWN_MODELS_TTL (they wait in its queue until a worker starts: KEDA
    # starts one on the work signal), and call the API ready without live workers. Off: such
    # a model is refused (404) and /readyz wants a live worker.
    serve_idle_models: bool = False
    # Jobs.
    result_ttl: Annotated[int, Field(ge=1)] = 24 * 3600
    job_timeout: Annotated[int, Field(ge=10)] = 3600
    job_retries: Annotated[int, Field(ge=0, le=10)] = 3
    idempotency_ttl: Annotated[int, Field(ge=1)] = 24 * 3600
    # `GET /v1/generations`: each caller's newest jobs, at most this many, created within
    # the last `result_ttl` seconds (a sorted set per caller, written by the submit script).
    max_listed_jobs: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    max_body_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024
    # A POST that may carry input images (UPLOAD_PATHS): three images of at most 4 MiB
    # (contract/inputs.py), base64 in JSON, with room to spare.
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 20 * 1024 * 1024
    # The OpenAI-compatible routes (/v1/images/*) wait for their job at most this long,
    # then cancel it and answer 504.
    images_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    # Streams: an XREAD blocks this long before the job's status is looked at again.
    stream_poll_ms: Annotated[int, Field(ge=50, le=30000)] = 2000
    # An idle event stream carries a comment after this long without a byte, at its next
    # idle read (so within IDLE_BACKOFF × stream_poll_ms more): for proxies that close
    # quiet connections.
    sse_keepalive_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    # Entries a job's event stream keeps: the workers' setting of the same name.
    stream_maxlen: Annotated[int, Field(ge=10)] = STREAM_MAXLEN
    # Bytes of snapshot frames a job's event stream holds: the workers' setting of the same
    # name (they trim the oldest frames past it). A request whose frames alone would need
    # more, at its preview size and format, is a 422 naming `snapshot_every`, before it is
    # queued (GenerationSpec.check_stream_budget).
    stream_max_bytes: Annotated[int, Field(ge=1024)] = STREAM_MAX_BYTES
    # Open SSE + WebSocket streams: past `max_streams` per process a new one is 503, past
    # `max_streams_per_caller` (per key, or per client address when open) it is 429. Each
    # open stream may hold a Redis connection: keep max_streams × API processes well under
    # Redis' maxclients (10000 by default).
    max_streams: Annotated[int, Field(ge=1, le=100_000)] = 1000
    max_streams_per_caller: Annotated[int, Field(ge=1, le=100_000)] = 64
    # Behind a reverse proxy: the peers (addresses, CIDR networks, or `*` for any) whose
    # X-Forwarded-For and X-Forwarded-Proto are believed (uvicorn's proxy headers); the
    # client is then the nearest address in X-Forwarded-For that is not a trusted proxy,
    # and rate limits and stream caps count per client. Empty (the default): no one's,
    # loopback included; every client is its connection's peer address.
    trusted_proxies: Annotated[list[str], NoDecode, Field(max_length=256)] = []
    # Browsers on these origins (`https://app.example.com`, or `*` for any) may call the
    # API from their pages (CORS, Starlette's CORSMiddleware). Empty (the default): no
    # cross-origin access; the API's own page at `/` is same-origin and needs none.
    cors_origins: Annotated[list[str], NoDecode, Field(max_length=256)] = []
    # Results in object storage (contract/results_store.py): `s3://bucket/prefix`, as the
    # workers have it (AWS_* variables read by the library). None (the default): in Redis.
    # An image is answered with a 307 to a presigned URL valid `results_url_ttl` seconds
    # (`redirect`), or streamed through the API (`proxy`).
    results_url: str | None = None
    results_url_ttl: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 3600
    results_delivery: Literal["redirect", "proxy"] = "redirect"
    # The store's address as clients reach it, named by presigned URLs, when it is not the
    # API's own AWS_ENDPOINT_URL (Compose: http://s3:8333 inside, localhost:8333 outside).
    results_public_endpoint: str | None = None
    # Traces (contract/tracing.py): the OTLP/HTTP collector spans go to, e.g.
    # `http://collector:4318` (posted to its /v1/traces). None (the default): no tracing.
    # The SDK's OTEL_* variables (sampler, headers, batch delays) apply when set.
    otlp_endpoint: str | None = None
    log_level: str = "INFO"

    @field_validator("api_keys", "webhook_allow_hosts", "trusted_proxies", "cors_origins",
                     mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return env_list(value)

    @field_validator("api_keys")
    @classmethod
    def _digests(cls, keys: list[str]) -> list[str]:
        out = []
        for k in keys:
            digest = k.lower().removeprefix("sha256:")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("api_keys holds SHA-256 hex digests of keys "
                                 "(`ddpm api-key` prints one), not the keys themselves")
            out.append(digest)
        return out

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        return [h.lower() for h in hosts]

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, proxies: list[str]) -> list[str]:
        # uvicorn would take a typo as a literal that matches nothing: refuse it instead.
        if "*" in proxies:
            if len(proxies) > 1:
                raise ValueError("trusted_proxies: `*` (any peer) stands alone")
            return proxies
        for p in proxies:
            try:
                ipaddress.ip_network(p) if "/" in p else ipaddress.ip_address(p)
            except ValueError:
                raise ValueError(f"trusted_proxies: {p[:64]!r} is not an IP address or "
                                 "network (e.g. 10.0.0.5, 10.0.0.0/8)") from None
        return proxies

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        # A browser sends its origin as scheme://host[:port], nothing more: anything else
        # would match no request, silently. Refuse it instead.
        if "*" in origins:
            if len(origins) > 1:
                raise ValueError("cors_origins: `*` (any origin) stands alone")
            return origins
        for o in origins:
            if not _ORIGIN.fullmatch(o):
                raise ValueError(f"cors_origins: {o[:64]!r} is not an origin: "
                                 "scheme://host[:port], no path (e.g. https://app.example.com)")
        return [o.lower() for o in origins]

    def proxy_options(self) -> dict[str, Any]:
        """uvicorn's proxy-headers options for `trusted_proxies` (`ddpm api`, `ddpm serve`):
        off when it is empty, which uvicorn's default (trust 127.0.0.1) is not."""
        return {"proxy_headers": bool(self.trusted_proxies),
                "forwarded_allow_ips": list(self.trusted_proxies) or None}
