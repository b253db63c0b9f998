"""RQ's own worker as the reference for ours (tests/worker/test_rq_conformance.py): the job
function it runs in place of `worker.tasks.generate`, the worker itself, and a snapshot of
the RQ keyspace a run leaves, with its names made comparable across runs."""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import ValidationError
from rq import SimpleWorker, get_current_job
from rq.job import Job

from contract.keys import JOB_FUNC, SERIALIZER, image_key, queue_name
from contract.limits import PRIORITIES
from contract.spec import GenerationSpec


def generate(**kwargs: Any) -> dict[str, Any]:
    """What `ddpm worker` does with a generation job, as far as RQ can see it: an invalid
    spec fails the job without retry (our worker: `JobError`, `retry=False`); a valid one
    returns the result dict our worker records (`contract.events.JobResult`), its two
    measured durations zero."""
    job = get_current_job()
    assert job is not None, "runs only inside RQ's worker"
    try:
        spec = GenerationSpec.model_validate(kwargs)
    except ValidationError:
        job.retries_left = 0          # as our worker does before failing it
        raise
    return {"model": spec.model, "num_images": spec.num_images, "seed": spec.seed,
            "sampler": spec.sampler, "steps": spec.steps,
            "image_keys": [image_key(job.id, i) for i in range(spec.num_images)],
            "queue_wait_s": 0.0, "run_s": 0.0}


def flaky(**kwargs: Any) -> dict[str, Any]:
    """Always fails as a job whose results cannot be stored does in our worker, leaving
    RQ's Retry to re-queue it while retries are left."""
    raise RuntimeError("storing results failed")


def swap_function(r: redis.Redis, job_id: str, func: Any) -> None:
    """Make the job enqueued by `contract.queueing.enqueue` call `func` (same kwargs): only
    the hash's `data` field (function and arguments) changes, every other field stays."""
    job = Job.fetch(job_id, connection=r, serializer=SERIALIZER)
    assert job.func_name == JOB_FUNC
    other = Job.create(func, kwargs=job.kwargs, connection=r, serializer=SERIALIZER)
    r.hset(job.key, "data", other.data)


class ReferenceWorker(SimpleWorker):
    """RQ's SimpleWorker as it is, without its pub/sub command listener: stopping that
    listener waits up to 60 s (RQ 3.0 with redis-py 8), and it writes nothing to Redis."""

    def subscribe(self) -> None:
        self.pubsub_thread = None


def run_reference(r: redis.Redis, model: str) -> str:
    """Run RQ's worker in burst mode on `model`'s queues; its name."""
    worker = ReferenceWorker([queue_name(model, p) for p in PRIORITIES], connection=r,
                             serializer=SERIALIZER)
    run_in_burst(worker)
    return worker.name


def run_in_burst(worker: Any) -> None:
    """`work(burst=True)`, then give the test back its own signal handlers."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.work(burst=True)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# -- snapshots ---------------------------------------------------------------------------


def epoch(stamp: bytes | str) -> float:
    """An RQ timestamp (ISO `...Z`, UTC) or epoch string as epoch seconds."""
    text = stamp.decode() if isinstance(stamp, bytes) else stamp
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.rstrip("Z")).replace(tzinfo=UTC).timestamp()


@dataclass
class Snapshot:
    """Every `rq:*` key a run left, named with placeholders (`<job0>`, `<worker>`,
    `<execution>`), and what each holds; `at`: when it was taken (epoch seconds)."""

    at: float
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    def key(self, name: str) -> dict[str, Any]:
        assert name in self.keys, f"{name} missing; keys: {sorted(self.keys)}"
        return self.keys[name]


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def snapshot(r: redis.Redis, job_ids: list[str], worker_name: str) -> Snapshot:
    """The RQ keyspace now: per key its type, TTL (seconds; -1 none) and content (hash:
    fields; zset: member → score relative to now; list/set: members; stream: entries;
    string: value), job ids and the worker's name replaced by placeholders and execution
    ids (found in the results streams) by `<execution>`."""
    names = {job_id: f"<job{i}>" for i, job_id in enumerate(job_ids)}
    names[worker_name] = "<worker>"
    executions: set[str] = set()
    for job_id in job_ids:
        for _, entry in r.xrange(f"rq:results:{job_id}"):
            if entry.get(b"execution_id"):
                executions.add(entry[b"execution_id"].decode())

    def name(text: str) -> str:
        for raw, placeholder in names.items():
            text = text.replace(raw, placeholder)
        for e in executions:
            text = text.replace(e, "<execution>")
        return text

    def value(v: bytes) -> str | bytes:
        """A hash or stream value: named text, or the bytes where not UTF-8 (`data`)."""
        try:
            return name(v.decode())
        except UnicodeDecodeError:
            return v

    at = time.time()
    snap = Snapshot(at)
    for raw_key in sorted(r.scan_iter("rq:*")):
        key = raw_key.decode()
        kind = _text(r.type(key))
        state: dict[str, Any] = {"type": kind, "ttl": r.ttl(key)}
        if kind == "hash":
            state["fields"] = {_text(k): value(v) for k, v in r.hgetall(key).items()}
        elif kind == "zset":
            state["members"] = {name(_text(m)): s - at
                                for m, s in r.zrange(key, 0, -1, withscores=True)}
        elif kind == "list":
            state["members"] = [name(_text(m)) for m in r.lrange(key, 0, -1)]
        elif kind == "set":
            state["members"] = sorted(name(_text(m)) for m in r.smembers(key))
        elif kind == "stream":
            state["entries"] = [_entry(e, name) for _, e in r.xrange(key)]
        else:
            state["value"] = r.get(key)
        snap.keys[name(key)] = state
    return snap


def _entry(fields: dict[bytes, bytes], name: Callable[[str], str]) -> dict[str, Any]:
    """A results-stream entry, named; its return value decoded as RQ decodes it (the JSON
    serializer, base64) under `return_value`."""
    out: dict[str, Any] = {_text(k): name(v.decode()) for k, v in fields.items()
                           if k != b"return_value"}
    if b"return_value" in fields:
        out["return_value"] = json.loads(name(base64.decodebytes(fields[b"return_value"])
                                              .decode()))
    return out
