"""Behind a reverse proxy: forwarded client addresses are believed only from the proxies in
DDPM_TRUSTED_PROXIES (uvicorn's proxy-headers machinery), over real HTTP against `ddpm api`
and `ddpm serve`. From a trusted proxy, each forwarded client has its own rate limit; from
anyone else, X-Forwarded-For is ignored (a client cannot pick its own rate-limit key).

The API listens on 127.0.0.1; a "proxy" is a client bound to another loopback address
(127.0.0.2), so trusted and untrusted peers are told apart on one machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from test_lean_api import advertise

from ddpm.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
PROXY = "127.0.0.2"
LIMITED = {"DDPM_RATE_LIMIT": "2", "DDPM_RATE_WINDOW": "86400"}


def _client(url: str, source: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30,
                        transport=httpx.HTTPTransport(local_address=source))


def _post(c: httpx.Client, forwarded_for: str | None) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return c.post("/v1/generations", json={"model": "tiny", "steps": 1},
                  headers=headers).status_code


def _rate_keys(r: redis.Redis) -> set[str]:
    return {k.decode().rsplit(":", 1)[0] for k in r.scan_iter("ddpm:rate:*")}


def _check_trusted(url: str, r: redis.Redis) -> None:
    """Two clients behind the trusted proxy each get the whole limit (2)."""
    with _client(url, PROXY) as c:
        assert [_post(c, "203.0.113.1") for _ in range(3)] == [202, 202, 429]
        # The proxy appends the address it saw to what the client sent: the nearest
        # untrusted one counts, not a client's own claim further left.
        assert [_post(c, "198.51.100.9, 203.0.113.2") for _ in range(3)] == [202, 202, 429]
        assert _post(c, "203.0.113.1, 203.0.113.2") == 429
        assert [_post(c, None) for _ in range(3)] == [202, 202, 429]    # the proxy itself
    assert _rate_keys(r) == {"ddpm:rate:ip:203.0.113.1", "ddpm:rate:ip:203.0.113.2",
                             f"ddpm:rate:ip:{PROXY}"}


def _check_untrusted(url: str, r: redis.Redis, source: str) -> None:
    """A client that sends a new X-Forwarded-For each time still has one limit."""
    with _client(url, source) as c:
        assert [_post(c, f"203.0.113.{i}") for i in range(1, 4)] == [202, 202, 429]
    assert _rate_keys(r) == {f"ddpm:rate:ip:{source}"}


def test_a_trusted_proxy_gives_each_client_its_own_rate_limit(
        start_api: Callable[..., Any], r: redis.Redis) -> None:
    api = start_api({**LIMITED, "DDPM_TRUSTED_PROXIES": f"10.0.0.0/8,{PROXY}"})
    advertise(r, "tiny")
    _check_trusted(api.url, r)


@pytest.mark.parametrize("trusted", [None, "10.0.0.1", "127.0.0.2"],
                         ids=["default", "another-proxy", "proxy-not-this-client"])
def test_a_spoofed_forwarded_for_is_ignored(start_api: Callable[..., Any], r: redis.Redis,
                                            trusted: str | None) -> None:
    """By default no address is trusted, loopback included; nor is one that is not the
    configured proxy."""
    api = start_api({**LIMITED, **({"DDPM_TRUSTED_PROXIES": trusted} if trusted else {})})
    advertise(r, "tiny")
    _check_untrusted(api.url, r, "127.0.0.1")


@pytest.mark.parametrize("value", ["not-an-address", "10.0.0.0/33", "*,10.0.0.1"])
def test_a_bad_trusted_proxies_setting_is_refused(value: str, redis_url: str) -> None:
    env = {**os.environ, "DDPM_TRUSTED_PROXIES": value}
    res = subprocess.run([sys.executable, "-m", "ddpm", "api", "--redis-url", redis_url,
                          "--port", str(free_port())], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "trusted_proxies" in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.fixture
def serve_proc(redis_url: str, models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """`ddpm serve` on the test Redis with extra DDPM_* variables; its URL once ready."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str]) -> str:
        port = free_port()
        log = open(tmp_path / f"serve{len(procs)}.log", "wb")  # noqa: SIM115
        full = {**os.environ, "DDPM_REDIS_URL": redis_url, "OMP_WAIT_POLICY": "PASSIVE",
                "DDPM_LOG_LEVEL": "WARNING", **env}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ddpm", "serve", "--models-dir", str(models_dir),
             "--device", "cpu", "--port", str(port)], cwd=ROOT, env=full, stdout=log,
            stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and procs[-1].poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail((tmp_path / f"serve{len(procs) - 1}.log").read_text()[-3000:])

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def test_ddpm_serve_honours_trusted_proxies_only(serve_proc: Callable[..., str],
                                                  r: redis.Redis) -> None:
    url = serve_proc({**LIMITED, "DDPM_TRUSTED_PROXIES": PROXY})
    _check_trusted(url, r)
    for key in r.scan_iter("ddpm:rate:*"):
        r.delete(key)
    _check_untrusted(url, r, "127.0.0.1")
