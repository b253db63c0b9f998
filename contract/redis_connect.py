"""Settings into Redis clients: a plain URL, or the primary Redis Sentinel names.

One description of where a Redis is (`RedisTarget`: a URL, or Sentinel addresses and a
primary name) and one way to connect to it, sync or async, used by the API, the worker and
the CLI, so they cannot connect differently. `connect` takes a target, not the settings:
a deployment that puts each model on its own Redis builds one target per model.

Through Sentinel, redis-py's `master_for` pool asks the Sentinels for the primary's address
on every new connection and drops a connection whose peer is no longer the primary (a
demoted one answers READONLY: the pool disconnects it). After a failover the clients'
connections to the dead primary fail (ConnectionError: the API answers 503, the worker
pauses in `Upkeep.wait_for_redis`), and the next ones reach the promoted replica, with no
restart. While no primary is known the pool raises MasterNotFoundError, a ConnectionError.

RedisSettingsFields are the settings (`DDPM_REDIS_URL`, `DDPM_REDIS_SENTINELS`,
`DDPM_REDIS_SENTINEL_MASTER`, `DDPM_REDIS_SENTINEL_PASSWORD`, `DDPM_REDIS_MODELS`), defined
once and mixed into the API's and the worker's settings objects.

Past one Redis (`DDPM_REDIS_MODELS`, model name → Redis URL): a model's queues, streams and
results live on its own Redis; models not named stay on the default one. The API routes by
model and, for what a job id addresses, by the id: a job made on a named Redis carries
`shard_tag(url)` and "-" before its random part (`job_id_shard`); the default Redis's ids
are unchanged. A worker needs no routing: it is pointed at its models' Redis
(`DDPM_REDIS_URL`), and refuses to start if the mapping in its environment puts one of its
models elsewhere (`check_models_here`). The setting lives here, not only in the API's
settings, for that check.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr, field_validator
from pydantic_settings import NoDecode
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MASTER = "mymaster"          # the name Redis's own sentinel.conf example monitors
SENTINEL_PORT = 26379
# A Sentinel that does not answer within this long is skipped for the next one: discovery
# then takes at most this much per dead Sentinel, not an OS connect timeout.
SENTINEL_TIMEOUT_S = 0.5


def sentinel_address(text: str) -> tuple[str, int]:
    """`host:port` (or `host`, port 26379; `[v6]:port`) → (host, port); ValueError naming
    the entry otherwise."""
    entry = text.strip()
    host, sep, port = entry.rpartition(":") if not entry.endswith("]") else (entry, "", "")
    if not sep:
        host, port = entry, str(SENTINEL_PORT)
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"redis_sentinels: {entry[:64]!r} is not host:port "
                         "(e.g. sentinel-0:26379)")
    return host, int(port)


@dataclass(frozen=True)
class RedisTarget:
    """Where a Redis is. `sentinels` empty: `url` names it. Otherwise the Sentinels at
    these addresses name the primary of `master`, and `url` gives only the database,
    user and password of the data nodes (its host and port are not used)."""

    url: str = DEFAULT_URL
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = DEFAULT_MASTER
    sentinel_password: str | None = None   # the Sentinels' own (`requirepass` in sentinel.conf)

    @property
    def via_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """For logs and messages: never a password."""
        if not self.via_sentinel:
            return redacted(self.url)
        where = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"primary {self.master!r} via Sentinel {where}"

    def _node_kwargs(self) -> dict[str, Any]:
        """The data nodes' database and credentials, read from the URL."""
        parts = urlsplit(self.url)
        db = parts.path.strip("/")
        out: dict[str, Any] = {"db": int(db) if db.isdigit() else 0}
        if parts.username:
            out["username"] = unquote(parts.username)
        if parts.password is not None:
            out["password"] = unquote(parts.password)
        return out

    def _sentinel_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S,
                               "socket_connect_timeout": SENTINEL_TIMEOUT_S}
        if self.sentinel_password is not None:
            out["password"] = self.sentinel_password
        return out


def connect(target: RedisTarget, **options: Any) -> Redis:
    """A redis-py client for `target`; `options` as `Redis.from_url` takes them
    (socket timeouts, `health_check_interval`, `max_connections`...). No I/O here."""
    if not target.via_sentinel:
        return Redis.from_url(target.url, **options)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=target._sentinel_kwargs())
    client: Redis = sentinel.master_for(target.master, redis_class=Redis,
                                        **target._node_kwargs(), **options)
    return client


def connect_async(target: RedisTarget, **options: Any) -> AsyncRedis:
    """`connect`'s asyncio twin, same target, same options."""
    if not target.via_sentinel:
        return AsyncRedis.from_url(target.url, **options)
    sentinel = AsyncSentinel(list(target.sentinels),
                             sentinel_kwargs=target._sentinel_kwargs())
    client: AsyncRedis = sentinel.master_for(target.master, redis_class=AsyncRedis,
                                             **target._node_kwargs(), **options)
    return client


def redacted(url: str) -> str:
    """`url` with its password masked: messages with it end up in logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


REDIS_SCHEMES = ("redis", "rediss", "unix")
SHARD_SEP = "-"      # between a job id's shard tag and its random part (a uuid4's hex: no "-")


def shard_tag(url: str) -> str:
    """The short name of a Redis in the job ids made there: "r" and 6 hex digits of the
    SHA-256 of its URL (password masked), so every API process, whatever the order of the
    mapping, names a Redis alike and ids stay valid across restarts."""
    return "r" + hashlib.sha256(redacted(url).encode()).hexdigest()[:6]


def job_id_shard(job_id: str) -> str:
    """The shard tag a job id carries ("" for an id made on the default Redis)."""
    tag, sep, _ = job_id.partition(SHARD_SEP)
    return tag if sep else ""


def _check_url(model: str, url: str) -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in REDIS_SCHEMES:
        raise ValueError(f"redis_models: the Redis of {model!r} must be a redis://, "
                         f"rediss:// or unix:// URL, not {redacted(str(url))[:80]!r}")
    return url


def env_list(value: object) -> object:
    """`a,b` or a JSON list, as people type lists into an environment (a settings field's
    `mode="before"` validator, with `NoDecode` on the field)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


class RedisSettingsFields(BaseModel):
    """The Redis settings of every process, mixed into its pydantic-settings object (env
    prefix `DDPM_`), so the API's and the worker's cannot drift apart."""

    # Without Sentinels: the Redis. With them: only its database and the data nodes'
    # user and password (`redis://:password@sentinel/0`: host and port unused).
    redis_url: str = DEFAULT_URL
    # `host:port` of each Sentinel (comma list or JSON list); empty: no Sentinel.
    redis_sentinels: Annotated[list[str], NoDecode] = []
    redis_sentinel_master: str = DEFAULT_MASTER   # the primary's name the Sentinels monitor
    redis_sentinel_password: SecretStr | None = None   # the Sentinels' own, if any
    # Past one Redis: model name → the URL of the Redis holding its queues, streams and
    # results (a JSON object); models not named use the Redis above.
    redis_models: Annotated[dict[str, str], NoDecode] = {}

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: object) -> object:
        return env_list(value)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_form(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            sentinel_address(entry)
        return entries

    @field_validator("redis_models", mode="before")
    @classmethod
    def _models_json(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as e:
                raise ValueError(f"redis_models must be a JSON object "
                                 f"{{\"model\": \"redis://...\"}}: {e}") from None
        return value

    @field_validator("redis_models")
    @classmethod
    def _models_form(cls, mapping: dict[str, str]) -> dict[str, str]:
        for model, url in mapping.items():
            if not model:
                raise ValueError("redis_models: a model name is empty")
            _check_url(model, url)
        return mapping

    def check_models_here(self, models: Iterable[str]) -> None:
        """A worker's safety check: ValueError naming each of `models` that the mapping
        puts on another Redis than this process's (its jobs would never reach it)."""
        here = "" if self.redis_sentinels else self.redis_url
        elsewhere = {m: self.redis_models[m] for m in models
                     if m in self.redis_models and self.redis_models[m] != here}
        if elsewhere:
            where = ", ".join(f"{m} on {redacted(u)}" for m, u in sorted(elsewhere.items()))
            raise ValueError(f"DDPM_REDIS_MODELS puts models this worker serves on another "
                             f"Redis than its own ({self.redis_target().describe()}): "
                             f"{where}; point the worker at that Redis (DDPM_REDIS_URL)")

    def redis_target(self) -> RedisTarget:
        password = self.redis_sentinel_password
        return RedisTarget(
            url=self.redis_url,
            sentinels=tuple(sentinel_address(s) for s in self.redis_sentinels),
            master=self.redis_sentinel_master,
            sentinel_password=password.get_secret_value() if password else None)
