"""contract/redis_connect.py: the Redis settings both processes share, read from the
environment, and the targets they make. Failover through real Sentinels:
tests/reliability/test_sentinel_failover.py."""

from __future__ import annotations

import asyncio

import pytest
import redis
from pydantic import ValidationError

from app.settings import ApiSettings
from contract.redis_connect import (
    RedisSettingsFields,
    RedisTarget,
    connect,
    connect_async,
    sentinel_address,
)
from worker.settings import WorkerSettings


@pytest.mark.parametrize(("text", "address"), [
    ("sentinel-0:26379", ("sentinel-0", 26379)), ("10.0.0.5", ("10.0.0.5", 26379)),
    (" s:1 ", ("s", 1)), ("[::1]:5000", ("::1", 5000)), ("[fe80::1]", ("fe80::1", 26379))])
def test_sentinel_addresses(text: str, address: tuple[str, int]) -> None:
    assert sentinel_address(text) == address


@pytest.mark.parametrize("text", ["", ":26379", "s:0", "s:65536", "s:port", "s:-1"])
def test_bad_sentinel_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        sentinel_address(text)


@pytest.mark.parametrize("settings", [ApiSettings, WorkerSettings])
def test_both_processes_read_the_same_redis_settings(
        settings: type[ApiSettings] | type[WorkerSettings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(RedisSettingsFields.model_fields) <= set(settings.model_fields)
    monkeypatch.setenv("DDPM_REDIS_URL", "redis://:node-secret@unused/2")
    monkeypatch.setenv("DDPM_REDIS_SENTINELS", "a:1, b")
    monkeypatch.setenv("DDPM_REDIS_SENTINEL_MASTER", "ddpm")
    monkeypatch.setenv("DDPM_REDIS_SENTINEL_PASSWORD", "sentinel-secret")
    target = settings().redis_target()
    assert target == RedisTarget(url="redis://:node-secret@unused/2",
                                 sentinels=(("a", 1), ("b", 26379)), master="ddpm",
                                 sentinel_password="sentinel-secret")
    assert "secret" not in target.describe() and "a:1,b:26379" in target.describe()
    monkeypatch.setenv("DDPM_REDIS_SENTINELS", '["c:2"]')            # a JSON list too
    assert settings().redis_target().sentinels == (("c", 2),)
    monkeypatch.setenv("DDPM_REDIS_SENTINELS", "a:1,b:nope")
    with pytest.raises(ValidationError) as e:
        settings()
    assert "b:nope" in str(e.value) and "node-secret" not in str(e.value)


def test_without_sentinels_the_url_is_the_redis(redis_url: str, r: redis.Redis) -> None:
    target = ApiSettings(redis_url=redis_url).redis_target()
    assert not target.via_sentinel and target.describe() == redis_url
    assert RedisTarget(url="redis://u:pw@h:1/0").describe() == "redis://u:***@h:1/0"
    connect(target).set("k", "sync")
    assert r.get("k") == b"sync"

    async def write() -> None:
        client = connect_async(target)
        await client.set("k", "async")
        await client.aclose()

    asyncio.run(write())
    assert r.get("k") == b"async"
