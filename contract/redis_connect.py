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
`DDPM_REDIS_SENTINEL_MASTER`, `DDPM_REDIS_SENTINEL_PASSWORD`), defined once and mixed into
the API's and the worker's settings objects.
"""

from __future__ import annotations

import json
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


def _split(value: object) -> object:
    """`a,b` or a JSON list, as people type lists into an environment."""
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

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: object) -> object:
        return _split(value)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_form(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            sentinel_address(entry)
        return entries

    def redis_target(self) -> RedisTarget:
        password = self.redis_sentinel_password
        return RedisTarget(
            url=self.redis_url,
            sentinels=tuple(sentinel_address(s) for s in self.redis_sentinels),
            master=self.redis_sentinel_master,
            sentinel_password=password.get_secret_value() if password else None)
