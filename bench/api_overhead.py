"""API overhead: `POST /v1/generations` and `GET /v1/generations/{id}` alone, against a bare
FastAPI endpoint that only writes (or reads) one Redis key, in the same run.

What the API adds on top of "HTTP in, one Redis round-trip, JSON out" — its validation, the
live-worker lookup, the RQ enqueue, the job view, its middlewares — is what this measures,
so both servers are separate processes run by uvicorn exactly as `ddpm api` runs it (one
process, the same loop and HTTP implementation, the same log level), both routes are plain
`def` routes (FastAPI runs them in its threadpool) on the same Redis, and one load generator
takes turns on them. No worker consumes: a worker advertisement is written the way a worker
writes it (refreshed before its TTL), so the API accepts the model and the jobs stay queued.
The API's rate limit and queue-depth cap are lifted (DDPM_RATE_LIMIT=0, DDPM_MAX_QUEUE_DEPTH).

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams (uvloop when
installed), C connections at once; it shares the CPU with the servers, so the table gives
each process's CPU time per request as well: on a small machine that is the steadier figure.

    python -m bench.api_overhead                                  # 8 connections, 2000 each
    python -m bench.api_overhead --concurrency 32 --seconds 10 --repeats 3 --json api.json
    python -m bench.api_overhead --requests 20000 --concurrency 64
    python -m bench.api_overhead --prefill-keys 100000     # a Redis holding a day of results

Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from contract.spec import ModelInfo
from contract.workers import advertise_worker, withdraw_worker
from ddpm.processes import child_kwargs, stop
from ddpm.redis_server import RedisServer, free_port, redis_server_binary

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench"
AD_TTL = 15            # seconds, as a worker with the default heartbeat advertises
AD_REFRESH = 5.0
BARE_PREFIX = "bench:bare:"

# -- helpers shared with bench.service (torch-free) ---------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values. Infinite
    values (bench.latency's unfinished requests) rank last: the quantile is infinite once
    it reaches them (plain interpolation would give NaN there)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    if k == lo or s[lo] == s[hi]:
        return s[lo]
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def versions() -> dict[str, str]:
    """Versions that move these numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "cpus": str(os.cpu_count())}
    for pkg in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "redis", "rq",
                "pydantic", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


class Child:
    """A server process of the benchmark with its output in a log file; stopped (SIGTERM,
    then SIGKILL) by `stop`, and by the kernel if this process dies first."""

    def __init__(self, name: str, argv: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=self._log, stderr=subprocess.STDOUT, **child_kwargs())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check(self) -> None:
        """SystemExit with the log's tail if the process has exited."""
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited with code {self.proc.returncode}:\n"
                             f"{self.tail()}")

    def wait_http(self, url: str, timeout: float = 120.0) -> None:
        """Until `url` answers 200 (SystemExit with the log if the process dies first)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not answer {url} in {timeout:.0f} s:\n"
                                 f"{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        stop(self.proc, timeout)
        self._log.close()


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers stop in order and temp files go."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def api_env(redis_url: str, log_level: str) -> dict[str, str]:
    """`ddpm api` settings that keep back-pressure out of the measurement."""
    return {"DDPM_REDIS_URL": redis_url, "DDPM_RATE_LIMIT": "0",
            "DDPM_MAX_QUEUE_DEPTH": str(10**9), "DDPM_LOG_LEVEL": log_level}


def start_api(redis_url: str, log_dir: Path, log_level: str,
              env: dict[str, str] | None = None) -> tuple[Child, str]:
    """`ddpm api` on a free port, once /healthz answers; (process, base URL)."""
    port = free_port()
    api = Child("api", [sys.executable, "-m", "ddpm", "api", "--redis-url", redis_url,
                        "--port", str(port)], log_dir,
                {**api_env(redis_url, log_level), **(env or {})})
    url = f"http://127.0.0.1:{port}"
    api.wait_http(f"{url}/healthz")
    return api, url


# -- the worker's advertisement, without a worker ----------------------------------------


@contextlib.contextmanager
def advertised(redis_url: str, info: ModelInfo, name: str = "bench-paused") -> Iterator[None]:
    """`ddpm:workers:{name}` as a live worker writes it (BatchWorker.advertise), renewed
    before it expires, for the block: the API then accepts `info.name`, and nothing runs."""
    client = redis.Redis.from_url(redis_url)
    doc = json.dumps({"name": name, "device": "cpu", "max_batch": 1, "active_slots": 0,
                      "models": [vars(info)], "broken": {}, "draining": False})
    done = threading.Event()

    def renew() -> None:
        while True:
            advertise_worker(client, name, doc, AD_TTL, time.time())
            if done.wait(AD_REFRESH):
                return

    advertise_worker(client, name, doc, AD_TTL, time.time())
    thread = threading.Thread(target=renew, name="bench-advertise", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            withdraw_worker(client, name)


# -- the bare peer ------------------------------------------------------------------------


def bare_app(redis_url: str) -> Any:
    """The least a JSON-over-Redis endpoint does: parse the body, one SET with a TTL (one GET
    to read), answer JSON. `def` routes like the API's, so both go through the threadpool."""
    from fastapi import FastAPI, HTTPException

    r = redis.Redis.from_url(redis_url)
    app = FastAPI(title="bare")

    @app.post("/bare", status_code=202)
    def bare_post(body: dict[str, Any]) -> dict[str, str]:
        key = uuid.uuid4().hex
        r.set(BARE_PREFIX + key, json.dumps(body), ex=3600)
        return {"id": key}

    @app.get("/bare/{key}")
    def bare_get(key: str) -> dict[str, Any]:
        raw = r.get(BARE_PREFIX + key)
        if raw is None:
            raise HTTPException(404, "no such key")
        return {"id": key, "body": json.loads(raw)}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve_bare(redis_url: str, port: int, log_level: str) -> None:
    """uvicorn.run exactly as `ddpm api` calls it (ddpm/cli.py `_api`)."""
    import uvicorn

    uvicorn.run(bare_app(redis_url), host="127.0.0.1", port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=5)


def start_bare(redis_url: str, log_dir: Path, log_level: str) -> tuple[Child, str]:
    port = free_port()
    bare = Child("bare", [sys.executable, "-m", "bench.api_overhead", "--serve-bare",
                          "--redis-url", redis_url, "--port", str(port),
                          "--log-level", log_level], log_dir)
    url = f"http://127.0.0.1:{port}"
    bare.wait_http(f"{url}/healthz")
    return bare, url


# -- the load generator -------------------------------------------------------------------


class HttpConn:
    """One keep-alive HTTP/1.1 connection: a request at a time, Content-Length or chunked
    responses. Far cheaper per request than a general client, which matters when the load
    generator shares two cores with the servers."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None
                      ) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            data = b"".join(chunks)
        else:
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data


Request = Callable[[int], tuple[str, str, bytes | None]]   # i → (method, path, body)


@dataclass
class Phase:
    """One endpoint under load."""

    name: str
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    first_error: str = ""
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p50_first_tenth_ms: float = 0.0     # growth within the phase shows state-size costs
    p50_last_tenth_ms: float = 0.0
    cpu_ms: dict[str, float] = field(default_factory=dict)    # process → CPU ms per request
    redis_keys: tuple[int, int] = (0, 0)                       # DBSIZE before, after

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def load(url: str, make: Request, expect: int, *, concurrency: int,
               count: int | None, seconds: float | None,
               keep: list[bytes] | None = None) -> tuple[list[float], float, int, str]:
    """Send requests from `concurrency` connections until `count` are done or `seconds`
    pass: (latencies, wall seconds, errors, first error). Bodies go to `keep` if given."""
    host, _, port = url.removeprefix("http://").partition(":")
    conns = [HttpConn(host, int(port)) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    latencies: list[float] = []
    errors = 0
    first_error = ""
    issued = 0
    deadline = time.perf_counter() + (seconds or 0.0)

    async def client(conn: HttpConn) -> None:
        nonlocal issued, errors, first_error
        while True:
            if count is not None:
                if issued >= count:
                    return
            elif time.perf_counter() >= deadline:
                return
            i = issued
            issued += 1
            method, path, body = make(i)
            t = time.perf_counter()
            status, data = await conn.request(method, path, body)
            latencies.append(time.perf_counter() - t)
            if status != expect:
                errors += 1
                first_error = first_error or f"{method} {path}: {status} {data[:200]!r}"
            elif keep is not None:
                keep.append(data)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return latencies, time.perf_counter() - t0, errors, first_error


def run_phase(name: str, url: str, make: Request, expect: int, *, concurrency: int,
              count: int | None, seconds: float | None, procs: dict[str, int],
              r: redis.Redis, keep: list[bytes] | None = None) -> Phase:
    """`load` on a fresh event loop, with the CPU time of `procs` (name → pid) and of this
    process (`client`) around it."""
    keys0 = int(r.dbsize())  # type: ignore[arg-type]
    before = {k: cpu_seconds(pid) for k, pid in procs.items()}
    client0 = time.process_time()
    lat, wall, errors, first_error = run_async(load(
        url, make, expect, concurrency=concurrency, count=count, seconds=seconds, keep=keep))
    client = time.process_time() - client0
    after = {k: cpu_seconds(pid) for k, pid in procs.items()}
    n = len(lat)
    cpu = {k: (after[k] - b) * 1e3 / max(n, 1) for k, b in before.items()  # type: ignore[operator]
           if b is not None and after[k] is not None}
    cpu["client"] = client * 1e3 / max(n, 1)
    tenth = max(1, n // 10)
    return Phase(name=name, requests=n, seconds=wall, errors=errors, first_error=first_error,
                 p50_ms=percentile(lat, 50) * 1e3, p99_ms=percentile(lat, 99) * 1e3,
                 p50_first_tenth_ms=statistics.median(lat[:tenth]) * 1e3 if lat else 0.0,
                 p50_last_tenth_ms=statistics.median(lat[-tenth:]) * 1e3 if lat else 0.0,
                 cpu_ms=cpu, redis_keys=(keys0, int(r.dbsize())))  # type: ignore[arg-type]


def run_async(coro: Any) -> Any:
    """asyncio.run on uvloop when installed (uvicorn picks it too): a cheaper client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the benchmark ------------------------------------------------------------------------


def prefill(r: redis.Redis, n: int) -> None:
    """`n` small keys with a TTL, as old jobs would leave them."""
    with r.pipeline(transaction=False) as p:
        for i in range(n):
            p.set(f"bench:fill:{i:09d}", b"x", ex=3600)
            if i % 10_000 == 9_999:
                p.execute()
        p.execute()


def generation_body(i: int, steps: int) -> bytes:
    return json.dumps({"model": MODEL, "num_images": 1, "steps": steps, "seed": i,
                       "sampler": "dpm++2m"}).encode()


def ids_of(bodies: list[bytes]) -> list[str]:
    return [json.loads(b)["id"] for b in bodies]


@contextlib.contextmanager
def replica_of(srv: RedisServer) -> Iterator[None]:
    """A redis-server replicating `srv`, in sync before the block runs."""
    port = free_port()
    # --dir: a replica stores the primary's snapshot it syncs from, in the working directory
    # unless told otherwise.
    home = tempfile.TemporaryDirectory(prefix="bench-replica-")
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", home.name,
                             "--replicaof", "127.0.0.1", str(srv.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **child_kwargs())
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.info("replication").get("master_link_status") == "up":
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the replica did not sync")
            time.sleep(0.05)
        yield
    finally:
        client.close()
        stop(proc, timeout=10)
        home.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=8, help="connections at once")
    p.add_argument("--requests", type=int, default=2000, help="requests per endpoint")
    p.add_argument("--seconds", type=float, help="run each endpoint this long instead")
    p.add_argument("--repeats", type=int, default=1, help="best (req/s) of this many rounds")
    p.add_argument("--warmup", type=int, default=200, help="requests per endpoint first")
    p.add_argument("--prefill-keys", type=int, default=0,
                   help="first fill Redis with this many unrelated keys (finished jobs' "
                        "results, events and images are keys too: a busy day leaves millions)")
    p.add_argument("--log-level", default="WARNING", help="of both servers (DDPM_LOG_LEVEL); "
                   "INFO adds uvicorn's access log")
    p.add_argument("--replicas", type=int, default=0,
                   help="replicas of the API's Redis (--replicaof), to measure "
                        "DDPM_REDIS_WAIT_REPLICAS")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    stop_on_sigterm()
    if args.serve_bare:
        serve_bare(args.redis_url, args.port, args.log_level)
        return
    count = None if args.seconds else args.requests
    info = ModelInfo(name=MODEL, image_size=16, in_channels=3, num_timesteps=1000)

    with contextlib.ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-api-")))
        srv = stack.enter_context(RedisServer())
        for _ in range(args.replicas):      # DDPM_REDIS_WAIT_REPLICAS=n needs n of them
            stack.enter_context(replica_of(srv))
        r = redis.Redis.from_url(srv.url)
        stack.enter_context(advertised(srv.url, info))
        api, api_url = start_api(srv.url, log_dir, args.log_level)
        stack.callback(api.stop)
        bare, bare_url = start_bare(srv.url, log_dir, args.log_level)
        stack.callback(bare.stop)
        assert srv.proc is not None
        api_procs = {"server": api.pid, "redis": srv.proc.pid}
        bare_procs = {"server": bare.pid, "redis": srv.proc.pid}
        redis_version = str(r.info("server")["redis_version"])
        prefill(r, args.prefill_keys)

        def post_api(i: int) -> tuple[str, str, bytes | None]:
            return "POST", "/v1/generations", generation_body(i, 20)

        def post_bare(i: int) -> tuple[str, str, bytes | None]:
            return "POST", "/bare", generation_body(i, 20)

        def phases(measure: bool) -> dict[str, Phase]:
            kw: dict[str, Any] = {"concurrency": args.concurrency, "r": r,
                                  "count": count if measure else args.warmup,
                                  "seconds": args.seconds if measure else None}
            api_bodies: list[bytes] = []
            bare_bodies: list[bytes] = []
            out = {"api POST": run_phase("POST /v1/generations", api_url, post_api, 202,
                                         keep=api_bodies, procs=api_procs, **kw),
                   "bare POST": run_phase("POST /bare", bare_url, post_bare, 202,
                                          keep=bare_bodies, procs=bare_procs, **kw)}
            api_ids, bare_ids = ids_of(api_bodies), ids_of(bare_bodies)
            if not api_ids or not bare_ids:
                raise SystemExit(f"no successful POSTs: {out['api POST'].first_error} "
                                 f"{out['bare POST'].first_error}")
            out["api GET"] = run_phase(
                "GET /v1/generations/{id}", api_url,
                lambda i: ("GET", f"/v1/generations/{api_ids[i % len(api_ids)]}", None), 200,
                procs=api_procs, **kw)
            out["bare GET"] = run_phase(
                "GET /bare/{id}", bare_url,
                lambda i: ("GET", f"/bare/{bare_ids[i % len(bare_ids)]}", None), 200,
                procs=bare_procs, **kw)
            for ph in out.values():
                if ph.errors:
                    print(f"warning: {ph.name}: {ph.errors} errors, first: {ph.first_error}",
                          file=sys.stderr)
            return out

        phases(measure=False)
        best: dict[str, Phase] = {}
        for _ in range(args.repeats):
            for k, ph in phases(measure=True).items():
                if k not in best or ph.rps > best[k].rps:
                    best[k] = ph
        api.check()
        bare.check()

    v = versions()
    print(f"API overhead: {', '.join(f'{k} {x}' for k, x in v.items())}, redis-server "
          f"{redis_version}")
    per = f"{args.seconds:g} s" if args.seconds else f"{count} requests"
    print(f"{args.concurrency} connections, {per} per endpoint, best of {args.repeats}, "
          f"servers: 1 uvicorn process each, log level {args.log_level}; worker paused "
          f"(advertised, not consuming): jobs stay queued; {args.prefill_keys} keys prefilled")
    print("The load generator runs on the same CPUs as the servers; its own CPU time per "
          "request is the 'client' column.")
    print()
    cols = ("server", "redis", "client")
    print(f"{'endpoint':26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}   "
          + " ".join(f"{c + ' ms':>9}" for c in cols) + "   CPU per request")
    for ph in best.values():
        print(f"{ph.name:26} {ph.rps:8.0f} {ph.p50_ms:8.2f} {ph.p99_ms:8.2f}   "
              + " ".join(f"{ph.cpu_ms[c]:9.3f}" if c in ph.cpu_ms else f"{'-':>9}"
                         for c in cols))
    print()
    for what in ("POST", "GET"):
        a, b = best[f"api {what}"], best[f"bare {what}"]
        print(f"{what:4} API/bare: req/s {a.rps / b.rps:.2f}x, p50 {a.p50_ms / b.p50_ms:.2f}x, "
              f"p99 {a.p99_ms / b.p99_ms:.2f}x, server CPU per request "
              f"{a.cpu_ms.get('server', 0) / max(b.cpu_ms.get('server', 0), 1e-9):.2f}x")
    post = best["api POST"]
    print(f"POST /v1/generations p50 over the phase: first tenth {post.p50_first_tenth_ms:.2f} "
          f"ms, last tenth {post.p50_last_tenth_ms:.2f} ms; Redis keys "
          f"{post.redis_keys[0]} → {post.redis_keys[1]}")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "api_overhead", "versions": v, "redis_server": redis_version,
            "settings": {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()
                         if k not in ("serve_bare", "redis_url", "port")},
            "phases": {k: {**asdict(ph), "rps": ph.rps} for k, ph in best.items()},
        }, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
