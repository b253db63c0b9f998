"""API fixtures: `ddpm api` (uvicorn) in its own process on a free port, against the test
Redis, plus an HTTP client for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ddpm.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]

# Streams look at the job's status often, so endings without an event show up quickly.
API_ENV = {"DDPM_STREAM_POLL_MS": "200", "DDPM_LOG_LEVEL": "WARNING"}


class ApiProcess:
    """`ddpm api` on a free port; `url` once /healthz answers."""

    def __init__(self, redis_url: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **API_ENV, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ddpm", "api", "--redis-url", redis_url,
             "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ddpm api did not start:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def start_api(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., ApiProcess]]:
    """`start_api(env={...})`: another API process (settings through DDPM_* variables),
    on the test Redis unless `redis=` names another."""
    started: list[ApiProcess] = []

    def start(env: dict[str, str] | None = None, redis: str | None = None) -> ApiProcess:
        api = ApiProcess(redis or redis_url, tmp_path / f"api{len(started)}.log", env)
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


@pytest.fixture
def api(start_api: Callable[..., ApiProcess]) -> ApiProcess:
    return start_api()


@pytest.fixture
def client(api: ApiProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30) as c:
        yield c
