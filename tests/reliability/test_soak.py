"""Load / soak: one API and one batching worker under a seeded random mix of requests for a
bounded time, then three checks that a long-lived service depends on.

* Error rate 0: every response is one the API documents for that request (5xx, a 4xx where
  success was due, a job that fails or never ends all count as errors).
* Memory stays flat: RSS of the API and the worker, after a warm-up, grows less than a
  bound an allocator's noise stays under but a per-request leak does not.
* Redis does not grow: after the load stops and the (short) TTLs pass, the key set is back
  to its baseline plus a short list of permanent bookkeeping keys, the RQ registries are
  empty, and no job-related key ever lacks a TTL once its job has ended.

CI runs a 30-second version (`-m "not slow"`). The long one is marked slow; run it by hand:
`DDPM_SOAK_SECONDS=600 python -m pytest -q -s -m slow tests/reliability/test_soak.py`.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

CI_SECONDS = 30.0
SOAK_SECONDS = float(os.environ.get("DDPM_SOAK_SECONDS", "600"))
SEED = int(os.environ.get("DDPM_SOAK_SEED", "20240501"))
CLIENTS = 4
# Results, streams, images, idempotency records: short, so a CI-length run sees them expire.
TTL = 10
RATE_WINDOW = 5          # rate-limit counters rotate (and must expire) every few seconds
JOB_DEADLINE = 180.0     # a job not ended this long after submission is lost
# RSS growth allowed after warm-up, per process. Why this number: the API and the worker sit
# at ~65-75 MB and ~260-310 MB; once every route, batch shape and thread has been used, what
# still moves is allocator noise (glibc arenas, pymalloc pools, oneDNN caches), a few MB.
# A leak that keeps anything per request or per job (a job's tensors, its PNGs, a response
# body, an unclosed stream's buffers) adds ≥ 10 kB each: the CI run's ~1-3 thousand
# requests would pass 32 MB only for leaks of ~10 kB+ per request; the 10-minute run's tens
# of thousands of requests expose ~1 kB per request. The bound is deliberately the same for
# both: noise does not scale with time, leaks do. `kb_per_request` is recorded too.
RSS_BOUND_MB = float(os.environ.get("DDPM_SOAK_RSS_MB", "32"))

# Keys that live as long as the service does, not per job: they may appear with the first
# job and stay. RQ's queue set and its group-maintenance lock (retaken every maintenance
# interval, expiring just before the next); the workers' measured rates and the models they
# served (contract/work.py, contract/workers.py: kept for a deployment scaled to zero).
# Anything else must be in the baseline or go away.
PERMANENT = ("rq:queues", "rq:clean_groups", "ddpm:throughput", "ddpm:models:known")
# Keys that belong to one job (or one window) and must carry a TTL once the job has ended.
JOB_PATTERNS = ("ddpm:events:*", "ddpm:image:*", "rq:job:*", "rq:results:*",
                "rq:execution:*", "rq:executions:*", "ddpm:idem:*", "ddpm:rate:*")
# RQ registries: sorted sets whose members must be cleaned out once their TTLs pass.
REGISTRY_PATTERNS = ("rq:wip:*", "rq:finished:*", "rq:failed:*", "rq:canceled:*",
                     "rq:deferred:*", "rq:scheduled:*", "rq:ready:*")
TERMINAL = {"succeeded", "failed", "canceled"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- what the clients saw --------------------------------------------------------------


@dataclass
class Tally:
    """Shared by the client threads: responses by status, job outcomes, errors."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    responses: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, str] = field(default_factory=dict)   # job id → final status/"lost"
    scenarios: Counter[str] = field(default_factory=Counter)
    cancels: Counter[str] = field(default_factory=Counter)   # status seen before DELETE
    errors: list[str] = field(default_factory=list)
    n_errors: int = 0
    abort: threading.Event = field(default_factory=threading.Event)  # a service died

    def count(self, key: str) -> None:
        with self.lock:
            self.responses[key] += 1

    def error(self, message: str) -> None:
        with self.lock:
            self.n_errors += 1
            if len(self.errors) < 30:
                self.errors.append(message)

    def outcome(self, job_id: str, status: str) -> None:
        with self.lock:
            self.outcomes[job_id] = status

    @property
    def requests(self) -> int:
        return sum(self.responses.values())


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` from /proc (what the kernel charges the process)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- one client -------------------------------------------------------------------------


class Client:
    """One closed-loop client: picks a scenario, runs it to the end, repeats until the
    deadline. Every response goes through `call`, which counts it and flags the
    unexpected."""

    SCENARIOS: tuple[tuple[str, float], ...] = (
        ("poll", 0.30), ("sse", 0.18), ("ws", 0.10), ("idempotent", 0.10),
        ("cancel_early", 0.08), ("cancel_running", 0.08), ("bad", 0.16))

    def __init__(self, url: str, tally: Tally, rng: random.Random) -> None:
        self.url = url
        self.tally = tally
        self.rng = rng
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=120))

    def close(self) -> None:
        self.http.close()

    def run(self, until: float) -> None:
        names = [n for n, _ in self.SCENARIOS]
        weights = [w for _, w in self.SCENARIOS]
        while time.monotonic() < until and not self.tally.abort.is_set():
            name = self.rng.choices(names, weights)[0]
            with self.tally.lock:
                self.tally.scenarios[name] += 1
            try:
                getattr(self, f"do_{name}")()
            except Exception as e:  # a client bug or a broken connection: an error, not a hang
                self.tally.error(f"{name}: {type(e).__name__}: {e}")

    # -- plumbing -----------------------------------------------------------------------

    def call(self, what: str, method: str, path: str, expect: Collection[int],
             **kw: Any) -> httpx.Response | None:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            self.tally.error(f"{method} {what} {path}: {type(e).__name__}: {e}")
            return None
        self.tally.count(f"{method} {what} {r.status_code}")
        if r.status_code not in expect:
            self.tally.error(f"{method} {what} {path}: {r.status_code} {r.text[:300]}")
            return None
        return r

    def body(self, *, long: bool = False) -> dict[str, Any]:
        """A random valid request: both models, all samplers, snapshots, labels, priorities.
        `long`: enough steps that the job is still running when it is canceled."""
        rng = self.rng
        model = rng.choice(["tiny", "tinycond"])
        b: dict[str, Any] = {"model": model, "num_images": rng.randint(1, 4),
                             "sampler": rng.choice(["ddpm", "ddim", "dpm++2m"]),
                             "steps": rng.randint(150, 300) if long else rng.randint(2, 10),
                             "seed": rng.randrange(2**31)}
        if b["sampler"] == "ddim" and rng.random() < 0.5:
            b["eta"] = 0.5
        if rng.random() < 0.4:
            b["snapshot_every"] = rng.randint(1, 3) if not long else 50
            b["snapshot_kind"] = rng.choice(["x0", "xt"])
        if model == "tinycond" and rng.random() < 0.7:
            b["class_label"] = rng.randrange(10)
            if rng.random() < 0.5:
                b["guidance_scale"] = 2.0
        if rng.random() < 0.2:
            b["priority"] = rng.choice(["high", "low"])
        return b

    def submit(self, body: dict[str, Any], headers: dict[str, str] | None = None
               ) -> dict[str, Any] | None:
        r = self.call("submit", "POST", "/v1/generations", {202}, json=body, headers=headers)
        if r is None:
            return None
        doc: dict[str, Any] = r.json()
        if r.headers.get("Idempotent-Replayed") != "true":
            self.tally.outcome(doc["id"], "submitted")
        return doc

    def finish(self, job_id: str, expect: str) -> dict[str, Any] | None:
        """Poll until the job ends; its final status must be `expect`."""
        deadline = time.monotonic() + JOB_DEADLINE
        while time.monotonic() < deadline and not self.tally.abort.is_set():
            r = self.call("status", "GET", f"/v1/generations/{job_id}", {200})
            if r is None:
                return None
            doc: dict[str, Any] = r.json()
            if doc["status"] in TERMINAL:
                self.tally.outcome(job_id, doc["status"])
                if doc["status"] != expect:
                    self.tally.error(f"job {job_id} ended {doc['status']}, expected {expect}:"
                                     f" {doc.get('error')}")
                    return None
                return doc
            time.sleep(0.1)
        self.tally.outcome(job_id, "lost")
        self.tally.error(f"job {job_id} did not end ({JOB_DEADLINE}s, or the run aborted)")
        return None

    def download(self, doc: dict[str, Any]) -> None:
        """The finished job's images (and one past the end: 404), grid, sometimes GIF."""
        root = f"/v1/generations/{doc['id']}"
        n = doc["request"]["num_images"]
        for i in range(n):
            r = self.call("image", "GET", f"{root}/images/{i}", {200})
            if r is not None and not r.content.startswith(PNG_MAGIC):
                self.tally.error(f"image {i} of {doc['id']} is not a PNG")
        self.call("image", "GET", f"{root}/images/{n}", {404})
        if self.rng.random() < 0.5:
            self.call("grid", "GET", f"{root}/grid.png", {200})
        if self.rng.random() < 0.3:
            r = self.call("gif", "GET", f"{root}/animation.gif", {200})
            if r is not None and not r.content.startswith(b"GIF8"):
                self.tally.error(f"animation of {doc['id']} is not a GIF")

    def sse(self, job_id: str, *, last_id: str | None = None
            ) -> list[tuple[str | None, str | None]]:
        """(event, id) of the job's stream until the server closes it."""
        headers = {"Last-Event-ID": last_id} if last_id else {}
        events: list[tuple[str | None, str | None]] = []
        cur: dict[str, str] = {}
        try:
            with self.http.stream("GET", f"/v1/generations/{job_id}/events",
                                  headers=headers) as r:
                self.tally.count(f"GET events {r.status_code}")
                if r.status_code != 200:
                    self.tally.error(f"events of {job_id}: {r.status_code} {r.read()[:300]!r}")
                    return events
                for line in r.iter_lines():
                    if not line:
                        if cur:
                            json.loads(cur.get("data", "null"))
                            events.append((cur.get("event"), cur.get("id")))
                            cur = {}
                        continue
                    if line.startswith(":"):
                        continue
                    key, _, value = line.partition(":")
                    cur[key] = value.removeprefix(" ")
        except httpx.HTTPError as e:
            self.tally.error(f"events of {job_id}: {type(e).__name__}: {e}")
        return events

    # -- scenarios ----------------------------------------------------------------------

    def do_poll(self) -> None:
        job = self.submit(self.body())
        if job is None:
            return
        doc = self.finish(job["id"], "succeeded")
        if doc is not None:
            self.download(doc)

    def do_sse(self) -> None:
        body = self.body()
        job = self.submit(body)
        if job is None:
            return
        events = self.sse(job["id"])
        kinds = [e for e, _ in events]
        if not kinds or kinds[-1] != "done":
            self.tally.error(f"SSE of {job['id']} ended with {kinds[-1:]}, not done")
        elif kinds.count("image") != body["num_images"]:
            self.tally.error(f"SSE of {job['id']}: {kinds.count('image')} image events for "
                             f"{body['num_images']} images")
        if len(events) > 2 and self.rng.random() < 0.3:
            # Resume from the middle: exactly the rest comes again.
            mid = len(events) // 2
            again = self.sse(job["id"], last_id=events[mid - 1][1])
            if again != events[mid:]:
                self.tally.error(f"SSE resume of {job['id']} differs")
        doc = self.finish(job["id"], "succeeded")
        if doc is not None and self.rng.random() < 0.5:
            self.download(doc)

    def do_ws(self) -> None:
        job = self.submit(self.body())
        if job is None:
            return
        url = self.url.replace("http://", "ws://") + f"/v1/generations/{job['id']}/ws"
        kinds: list[str] = []
        code: int | None = None
        try:
            with connect(url, open_timeout=60, close_timeout=10) as ws:
                try:
                    while True:
                        kinds.append(json.loads(ws.recv(timeout=120))["event"])
                except ConnectionClosed:
                    pass
                code = ws.close_code
        except (OSError, TimeoutError, ConnectionClosed) as e:
            self.tally.error(f"ws of {job['id']}: {type(e).__name__}: {e}")
            return
        self.tally.count(f"WS ws {code}")
        if code != 1000 or not kinds or kinds[-1] != "done":
            self.tally.error(f"ws of {job['id']}: close {code}, last events {kinds[-3:]}")
        self.finish(job["id"], "succeeded")

    def do_idempotent(self) -> None:
        body = self.body()
        key = f"soak-{self.rng.randrange(2**62)}"
        first = self.submit(body, {"Idempotency-Key": key})
        if first is None:
            return
        for _ in range(self.rng.randint(1, 3)):
            r = self.call("submit", "POST", "/v1/generations", {202}, json=body,
                          headers={"Idempotency-Key": key})
            if r is not None and (r.json()["id"] != first["id"]
                                  or r.headers.get("Idempotent-Replayed") != "true"):
                self.tally.error(f"idempotent replay of {first['id']} gave {r.json()['id']}")
        other = {**body, "seed": body["seed"] + 1}
        self.call("submit", "POST", "/v1/generations", {422}, json=other,
                  headers={"Idempotency-Key": key})
        self.finish(first["id"], "succeeded")

    def _cancel(self, job_id: str) -> None:
        """DELETE: 200 and `canceled`, or 409 if the job beat us to the end (then it must
        have succeeded). A canceled job's stream ends with `canceled`."""
        before = self.call("status", "GET", f"/v1/generations/{job_id}", {200})
        if before is not None:
            with self.tally.lock:
                self.tally.cancels[before.json()["status"]] += 1
        r = self.call("cancel", "DELETE", f"/v1/generations/{job_id}", {200, 409})
        if r is None:
            return
        if r.status_code == 409:
            self.finish(job_id, "succeeded")
            return
        if r.json()["status"] != "canceled":
            self.tally.error(f"DELETE {job_id} answered {r.json()['status']}")
        self.finish(job_id, "canceled")
        if self.rng.random() < 0.5:
            kinds = [e for e, _ in self.sse(job_id)]
            if kinds[-1:] != ["canceled"]:
                self.tally.error(f"SSE of canceled {job_id} ended {kinds[-3:]}")
        self.call("cancel", "DELETE", f"/v1/generations/{job_id}", {409})

    def do_cancel_early(self) -> None:
        """Cancel right after submitting: queued when the worker is busy, else just started."""
        job = self.submit({**self.body(long=True), "priority": "low"})
        if job is not None:
            self._cancel(job["id"])

    def do_cancel_running(self) -> None:
        """Cancel once the job is running (its slots must be freed mid-denoising)."""
        job = self.submit(self.body(long=True))
        if job is None:
            return
        deadline = time.monotonic() + JOB_DEADLINE
        while time.monotonic() < deadline and not self.tally.abort.is_set():
            r = self.call("status", "GET", f"/v1/generations/{job['id']}", {200})
            if r is None or r.json()["status"] != "queued":
                break
            time.sleep(0.1)
        time.sleep(self.rng.uniform(0, 0.5))
        self._cancel(job["id"])

    def do_bad(self) -> None:
        """Requests the API must refuse with a 4xx (never a 5xx), plus the cheap GETs."""
        rng = self.rng
        case = rng.randrange(9)
        gen = "/v1/generations"
        if case == 0:
            self.call("bad", "POST", gen, {404}, json={"model": "nope"})
        elif case == 1:
            self.call("bad", "POST", gen, {422}, json={"model": "tiny", "class_label": 3})
        elif case == 2:
            self.call("bad", "POST", gen, {422}, json={"model": "tinycond", "class_label": 10})
        elif case == 3:
            self.call("bad", "POST", gen, {422},
                      json={"model": "tiny", rng.choice(["steps", "num_images"]): 0})
        elif case == 4:
            self.call("bad", "POST", gen, {422}, json={"model": "tiny", "colour": "red"})
        elif case == 5:
            self.call("bad", "GET", f"{gen}/{rng.randrange(2**64):x}", {404})
        elif case == 6:
            self.call("bad", "GET", f"{gen}/no.such.job/grid.png", {404})
        elif case == 7:
            self.call("models", "GET", "/v1/models", {200})
        else:
            self.call("metrics", "GET", "/metrics", {200})


# -- Redis views --------------------------------------------------------------------------


def keys(r: redis.Redis, pattern: str = "*") -> set[str]:
    return {k.decode() for k in r.scan_iter(match=pattern, count=1000)}


def without_ttl(r: redis.Redis) -> dict[str, str]:
    """Job-related keys with no TTL, each with its job's RQ status (why it might be kept)."""
    out = {}
    for pattern in JOB_PATTERNS:
        for k in keys(r, pattern):
            if r.ttl(k) == -1:
                job = k.split(":")[2] if k.count(":") >= 2 else ""
                status = r.hget(f"rq:job:{job}", "status")
                out[k] = status.decode() if status else "?"
    return out


def registry_members(r: redis.Redis) -> dict[str, int]:
    return {k: int(r.zcard(k)) for p in REGISTRY_PATTERNS for k in keys(r, p)
            if r.type(k) == b"zset" and r.zcard(k)}


def rss_figures(series: list[float], growth: float) -> dict[str, float]:
    if not series:
        return {}
    return {"start": round(series[0], 1), "end": round(series[-1], 1),
            "max": round(max(series), 1), "growth_after_warmup": growth}


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


# -- the test ------------------------------------------------------------------------------


@pytest.fixture
def sampler() -> Iterator[Callable[..., dict[str, list[float]]]]:
    """`start(pids, r)`: a thread sampling RSS of each pid and DBSIZE once a second."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(pids: dict[str, int], r: redis.Redis) -> dict[str, list[float]]:
        series: dict[str, list[float]] = {name: [] for name in pids} | {"keys": []}

        def loop() -> None:
            while not stop.is_set():
                try:
                    for name, pid in pids.items():
                        series[name].append(rss_mb(pid))
                    series["keys"].append(float(r.dbsize()))
                except (OSError, RuntimeError):   # a process died: the test says so
                    pass
                stop.wait(1.0)

        t = threading.Thread(target=loop, name="soak-sampler", daemon=True)
        t.start()
        threads.append(t)
        return series

    yield start
    stop.set()
    for t in threads:
        t.join(timeout=5)


@pytest.mark.parametrize("seconds", [
    pytest.param(CI_SECONDS, id="ci"),
    pytest.param(SOAK_SECONDS, id="long", marks=pytest.mark.slow),
])
def test_soak(seconds: float, r: redis.Redis, spawn_worker: Callable[..., Any],
              start_api: Callable[..., Any], sampler: Callable[..., dict[str, list[float]]],
              record: Callable[..., None]) -> None:
    t0 = time.monotonic()
    worker = spawn_worker("--max-batch", "8", env={
        "DDPM_RESULT_TTL": str(TTL), "DDPM_LOG_LEVEL": "WARNING"})
    api = start_api({"DDPM_RESULT_TTL": str(TTL), "DDPM_IDEMPOTENCY_TTL": str(TTL),
                     "DDPM_RATE_LIMIT": "1000000", "DDPM_RATE_WINDOW": str(RATE_WINDOW)})
    with httpx.Client(base_url=api.url, timeout=30) as c:
        if not wait_until(lambda: c.get("/readyz").status_code == 200, 120):
            pytest.fail(f"no worker became ready:\n{worker.log()[-4000:]}")
    # Baseline: the worker registered and advertising, no job yet. One maintenance pass
    # first, so its lock keys are part of the picture.
    time.sleep(3)
    baseline = keys(r)

    series = sampler({"api": api.proc.pid, "worker": worker.proc.pid}, r)
    tally = Tally()
    clients = [Client(api.url, tally, random.Random(SEED + i)) for i in range(CLIENTS)]
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=cl.run, args=(until,), name=f"soak-client{i}")
               for i, cl in enumerate(clients)]
    for t in threads:
        t.start()
    join_by = until + 2 * JOB_DEADLINE
    while any(t.is_alive() for t in threads) and time.monotonic() < join_by:
        if not tally.abort.is_set() and (api.proc.poll() is not None
                                         or worker.proc.poll() is not None):
            tally.abort.set()        # fail in seconds, not after every job's deadline
            for cl in clients:
                cl.close()
        time.sleep(0.5)
    for cl in clients:
        cl.close()
    hung = [t.name for t in threads if t.is_alive()]
    load_s = time.monotonic() - (until - seconds)
    n_samples = len(series["keys"])
    rss = {name: list(series[name]) for name in ("api", "worker")}
    peak_keys = int(max(series["keys"], default=len(baseline)))

    # Every job ended; nothing is left queued or running.
    queued = {k: int(r.llen(k)) for k in keys(r, "rq:queue:*") if r.type(k) == b"list"}
    running = {k: int(r.zcard(k)) for k in keys(r, "rq:wip:*")}
    # Right after the jobs end: every job-related key must already carry a TTL.
    no_ttl = without_ttl(r)

    # After the TTLs (plus maintenance passes to clean the registries): back to baseline.
    def settled() -> bool:
        extra = keys(r) - baseline - set(PERMANENT)
        return not extra and not registry_members(r)

    t_end = time.monotonic()
    wait_until(settled, TTL + 20)
    settle_s = time.monotonic() - t_end
    final = keys(r)
    extra = sorted(final - baseline - set(PERMANENT))
    registries = registry_members(r)

    # Memory: median of three samples at the end of the warm-up (first third) and at the end.
    warm = max(1, n_samples // 3)
    growth = {name: round(statistics.median(s[-3:]) - statistics.median(s[warm:warm + 3]), 1)
              if len(s) > warm else 0.0 for name, s in rss.items()}

    by_status: Counter[str] = Counter()
    for k, n in tally.responses.items():
        by_status[k.rsplit(" ", 1)[1]] += n
    outcomes = Counter(tally.outcomes.values())
    jobs = len(tally.outcomes)
    record(
        seconds_of_load=round(load_s, 1), clients=CLIENTS, requests=tally.requests,
        by_status=dict(sorted(by_status.items())),
        responses=dict(sorted(tally.responses.items())), scenarios=dict(tally.scenarios),
        jobs_submitted=jobs, jobs_succeeded=outcomes["succeeded"],
        jobs_canceled=outcomes["canceled"], jobs_failed=outcomes["failed"],
        jobs_lost=outcomes["lost"] + outcomes["submitted"],
        canceled_while=dict(tally.cancels), errors=tally.n_errors,
        error_rate=round(tally.n_errors / max(1, tally.requests), 6),
        rss_api_mb=rss_figures(rss["api"], growth["api"]),
        rss_worker_mb=rss_figures(rss["worker"], growth["worker"]),
        kb_per_request={k: round(v * 1024 / max(1, tally.requests), 2)
                        for k, v in growth.items()},
        redis_keys={"baseline": len(baseline), "peak": peak_keys, "final": len(final),
                    "seconds_to_settle": round(settle_s, 1)},
        keys_without_ttl=len(no_ttl), total_seconds=round(time.monotonic() - t0, 1))

    problems = []
    dead = [f"{name} exited {p.proc.poll()}" for name, p in (("api", api), ("worker", worker))
            if p.proc.poll() is not None]
    if dead:
        problems.append(f"processes died: {dead}")
    if hung:
        problems.append(f"client threads never finished: {hung}")
    if tally.n_errors:
        problems.append(f"{tally.n_errors} errors in {tally.requests} requests:\n  "
                        + "\n  ".join(tally.errors))
    if not (jobs and outcomes["succeeded"] and outcomes["canceled"]):
        problems.append(f"too little load to judge: {dict(outcomes)}")
    if outcomes["lost"] or outcomes["submitted"] or outcomes["failed"]:
        problems.append(f"jobs failed or lost: {dict(outcomes)}")
    if any(queued.values()) or any(running.values()):
        problems.append(f"jobs left behind after the load: {queued} {running}")
    if no_ttl:
        problems.append(f"{len(no_ttl)} job keys without a TTL after their jobs ended "
                        f"(key: job status): {dict(list(no_ttl.items())[:10])}")
    if extra or registries:
        problems.append(f"not back to baseline {TTL + 20}s after the load: {len(extra)} extra "
                        f"keys {extra[:10]}, registry members {registries}")
    for name, g in growth.items():
        if g >= RSS_BOUND_MB:
            problems.append(f"{name} RSS grew {g} MB after warm-up (bound {RSS_BOUND_MB} MB):"
                            f" {[round(x) for x in rss[name]]}")
    logs = f"\n--- worker log ---\n{worker.log()[-3000:]}\n--- api log ---\n{api.log()[-3000:]}"
    assert not problems, "\n".join(problems) + logs
