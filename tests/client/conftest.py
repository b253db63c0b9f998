"""The live stack the client tests drive: its own Redis, a `ddpm worker` serving the tiny
test models and a `ddpm api` process, started once for tests/client/ (package scope: its
modules share one worker start, seconds on 2 cores)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ddpm_client as dc
import pytest
import redis

from ddpm.redis_server import RedisServer
from tests.conftest import ApiProcess, WorkerProcess


@dataclass
class Stack:
    url: str
    redis: redis.Redis
    redis_url: str
    tmp: Path


@pytest.fixture(scope="package")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("client-stack")
    with RedisServer() as srv:
        worker = WorkerProcess(srv.url, models_dir, tmp / "worker.log")
        api = ApiProcess(srv.url, tmp / "api.log")
        try:
            with dc.Client(api.url) as c:        # ready: the worker advertises its models
                for _ in range(600):
                    if {m.name for m in c.models()} >= {"tiny", "tinycond"}:
                        break
                    threading.Event().wait(0.1)
                else:
                    pytest.fail(f"no worker advertised:\n{worker.log()[-3000:]}")
            yield Stack(api.url, redis.Redis.from_url(srv.url), srv.url, tmp)
        finally:
            api.stop()
            worker.stop()
