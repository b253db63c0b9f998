"""The work waiting per model, in image-steps: the signal an autoscaler reads (`GET /v1/work`
and the API's `ddpm_work_*` gauges; KEDA's `metrics-api` scaler reads the JSON directly).

A queue's length says nothing of its work (a 1000-step 16-image job and a 10-step 1-image
job are one entry each) and nothing of the jobs already running, so a scaler on it stops
workers mid-job. Here, per model:

- queued: each queued job's cost (`spec.total_steps`; a drained job re-queued with its
  resume state: what it has left), one value per job (`keys.cost_key`) written with the
  job at enqueue (`contract.queueing.enqueue`, inside the API's admission script), rewritten
  by a drain (and a checkpoint) with what is left, deleted by the worker when the job
  ends; it expires with the job's results. Only the ids in the model's queues are summed,
  so a value left behind (a job deleted behind our back, canceled while queued) never
  counts, and its expiry bounds the memory it holds without any sweeping. A queued job
  without a value (enqueued by another tool, or queued longer than its results live) has
  its spec read once and its value written back (`REPAIR_MAX` per read);
- running: the image-steps still to compute on workers (every admitted image not yet
  final, waiting ones included), from their advertisements (renewed every heartbeat, and
  by the worker soon after it takes jobs: worker/throughput.py);
- workers (live, and ready: model loaded, not draining), what one worker clears per second
  (measured by the workers: the median over live ones, else the last one stored in
  `keys.THROUGHPUT`) and the model's load time.

One read is three pipelined round-trips whatever the number of jobs: the live workers, the
queue set and the stored rates; the advertisements and every queue's ids; every queued id's
cost (one MGET per 1,000 ids). No script: a read must work when Redis is full (a script
that may write is refused then, on Redis 7) and on any Redis a reader is pointed at.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, TypedDict

from redis import Redis
from redis.exceptions import RedisError

from .keys import PREFIX, THROUGHPUT, WORKERS_INDEX, cost_key, worker_key
from .limits import PRIORITIES
from .queueing import QUEUE_KEY_PREFIX, QUEUES_SET, fetch_jobs
from .spec import GenerationSpec

log = logging.getLogger("ddpm.work")

__all__ = ["REPAIR_MAX", "THROUGHPUT_TTL", "ModelWork", "WorkerModelWork", "read_work",
           "store_rates", "worker_model_work"]

REPAIR_MAX = 256                     # queued jobs without a cost whose spec one read reads
THROUGHPUT_TTL = 30 * 24 * 3600      # a stored rate outlives any scale-to-zero
_MGET_CHUNK = 1000
_QUEUE_PREFIX = f"{QUEUE_KEY_PREFIX}{PREFIX}."    # rq:queue:ddpm.


class WorkerModelWork(TypedDict):
    """What a worker's advertisement (`ddpm:workers:{name}`, field `work`) says of one
    model it serves."""

    remaining_image_steps: int        # image-steps still to compute on this worker
    image_steps_per_s: float | None   # measured here (None: not yet)
    load_s: float | None              # the model's load time here
    ready: bool                       # loaded and not draining


def worker_model_work(remaining: int, rate: float | None, load_s: float | None,
                      ready: bool) -> WorkerModelWork:
    return {"remaining_image_steps": int(remaining),
            "image_steps_per_s": None if rate is None else round(float(rate), 3),
            "load_s": None if load_s is None else round(float(load_s), 3),
            "ready": bool(ready)}


@dataclass(frozen=True)
class ModelWork:
    """The work signal of one model (the fields of `GET /v1/work`)."""

    queued_jobs: int = 0
    queued_image_steps: int = 0
    running_image_steps: int = 0
    workers: int = 0
    workers_ready: int = 0
    image_steps_per_s: float | None = None
    model_load_s: float | None = None

    @property
    def remaining_image_steps(self) -> int:
        return self.queued_image_steps + self.running_image_steps

    @property
    def seconds_of_work(self) -> float:
        """Worker-seconds of work waiting (0 while the rate is unknown)."""
        rate = self.image_steps_per_s
        return self.remaining_image_steps / rate if rate else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"queued_jobs": self.queued_jobs,
                "queued_image_steps": self.queued_image_steps,
                "running_image_steps": self.running_image_steps,
                "remaining_image_steps": self.remaining_image_steps,
                "workers": self.workers, "workers_ready": self.workers_ready,
                "image_steps_per_s": self.image_steps_per_s,
                "seconds_of_work": round(self.seconds_of_work, 3),
                "model_load_s": self.model_load_s}


@dataclass
class _Tally:
    queued_jobs: int = 0
    queued_image_steps: int = 0
    running_image_steps: int = 0
    workers: int = 0
    workers_ready: int = 0
    rates: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    stored: dict[str, Any] = field(default_factory=dict)

    def result(self) -> ModelWork:
        rate = statistics.median(self.rates) if self.rates else _number(
            self.stored.get("image_steps_per_s"))
        load = max(self.loads) if self.loads else _number(self.stored.get("load_s"))
        return ModelWork(self.queued_jobs, self.queued_image_steps, self.running_image_steps,
                         self.workers, self.workers_ready,
                         None if rate is None else round(rate, 3),
                         None if load is None else round(load, 3))


def read_work(redis: Redis, now: float, *, repair: int = REPAIR_MAX) -> dict[str, ModelWork]:
    """The work signal of every model a live worker advertises, with a queue in RQ's queue
    set, or with a stored rate; by name. `now`: epoch seconds (what is live)."""
    with redis.pipeline(transaction=False) as p:
        p.zrangebyscore(WORKERS_INDEX, f"({now!r}", "+inf")
        p.smembers(QUEUES_SET)
        p.hgetall(THROUGHPUT)
        names, queue_keys, stored = p.execute()
    queues = sorted(k for k in map(_text, queue_keys) if _queue_model(k) is not None)
    with redis.pipeline(transaction=False) as p:
        if names:
            p.mget([worker_key(_text(n)) for n in names])
        for q in queues:
            p.lrange(q, 0, -1)
        replies = p.execute()
    docs = replies.pop(0) if names else []
    tallies: dict[str, _Tally] = {}
    for model, raw in stored.items():
        record = _json(raw)
        if isinstance(record, dict):
            tallies.setdefault(_text(model), _Tally()).stored = record
    for raw in docs:
        doc = _json(raw) if raw is not None else None
        if isinstance(doc, dict):
            _count_worker(doc, tallies)
    queued: list[tuple[str, list[bytes]]] = []       # (model, its queue's job ids)
    for q, members in zip(queues, replies, strict=True):
        model = _queue_model(q)
        assert model is not None
        tallies.setdefault(model, _Tally()).queued_jobs += len(members)
        queued.append((model, [m if isinstance(m, bytes) else m.encode() for m in members]))
    missing = _add_costs(redis, queued, tallies)
    if missing and repair > 0:
        _repair(redis, missing[:repair], tallies)
    return {m: t.result() for m, t in sorted(tallies.items())}


def store_rates(redis: Redis, rates: dict[str, tuple[float, float | None]],
                now: float) -> None:
    """A worker's measured rates (model → (image-steps per second, load seconds)), kept
    for when no worker of the model is live."""
    if not rates:
        return
    with redis.pipeline(transaction=False) as p:
        for model, (rate, load) in rates.items():
            p.hset(THROUGHPUT, model, json.dumps({
                "image_steps_per_s": round(rate, 3),
                "load_s": None if load is None else round(load, 3), "at": now}))
        p.expire(THROUGHPUT, THROUGHPUT_TTL)
        p.execute()


# -- inside ------------------------------------------------------------------------------


def _count_worker(doc: dict[str, Any], tallies: dict[str, _Tally]) -> None:
    """One live worker's advertisement into the tallies. A worker advertising no `work`
    (one from before the signal) counts as a worker of its models, its running work
    unknown (0)."""
    work = doc.get("work")
    if not isinstance(work, dict):
        names = [m.get("name") for m in doc.get("models", []) if isinstance(m, dict)]
        work = {n: {"ready": not doc.get("draining")} for n in names if isinstance(n, str)}
    for model, w in work.items():
        if not isinstance(w, dict):
            continue
        t = tallies.setdefault(str(model), _Tally())
        t.workers += 1
        t.workers_ready += bool(w.get("ready"))
        t.running_image_steps += max(0, int(_number(w.get("remaining_image_steps")) or 0))
        rate, load = _number(w.get("image_steps_per_s")), _number(w.get("load_s"))
        if rate is not None and rate > 0:
            t.rates.append(rate)
        if load is not None:
            t.loads.append(load)


def _add_costs(redis: Redis, queued: list[tuple[str, list[bytes]]],
               tallies: dict[str, _Tally]) -> list[tuple[str, str]]:
    """Each queued job's cost added to its model's tally; the jobs without one. Keys are
    built as bytes: 10,000 of them through redis-py's str encoder cost more than Redis's
    MGET of them."""
    prefix = cost_key("").encode()
    with redis.pipeline(transaction=False) as p:
        for _, ids in queued:
            for i in range(0, len(ids), _MGET_CHUNK):
                p.mget([prefix + job for job in ids[i:i + _MGET_CHUNK]])
        replies = iter(p.execute())
    missing = []
    for model, ids in queued:
        t = tallies[model]
        values = [v for _ in range(0, len(ids), _MGET_CHUNK) for v in next(replies)]
        for job, value in zip(ids, values, strict=True):
            try:
                t.queued_image_steps += int(value)
            except (TypeError, ValueError):
                missing.append((model, job.decode()))
    return missing


def _repair(redis: Redis, missing: list[tuple[str, str]], tallies: dict[str, _Tally]) -> None:
    """Queued jobs without a cost: their specs read, their costs counted and written back
    (unless a drain wrote one meanwhile); a job that is not ours, or gone, counts 0."""
    jobs = fetch_jobs(redis, [job for _, job in missing])
    costs: dict[str, tuple[int, int]] = {}
    for (model, job_id), job in zip(missing, jobs, strict=True):
        if job is None:
            continue
        try:
            cost = GenerationSpec.model_validate(job.kwargs).total_steps
        except Exception:  # not a generation job, or one this reader cannot decode
            continue
        tallies[model].queued_image_steps += cost
        costs[job_id] = (cost, int(job.result_ttl or 0) if (job.result_ttl or 0) > 0
                         else 24 * 3600)
    if costs:
        try:
            with redis.pipeline(transaction=False) as p:
                for job_id, (cost, ttl) in costs.items():
                    p.set(cost_key(job_id), cost, ex=ttl, nx=True)
                p.execute()
        except RedisError as e:     # a full Redis: counted all the same, written next time
            log.debug("work: costs not written back: %s", e)
    log.info("work: %d queued jobs had no cost; %d read from their specs",
             len(missing), len(costs))


def _queue_model(key: str) -> str | None:
    """The model of one of our RQ queue keys (`rq:queue:ddpm.{model}.{priority}`)."""
    if not key.startswith(_QUEUE_PREFIX):
        return None
    model, _, priority = key[len(_QUEUE_PREFIX):].rpartition(".")
    return model if model and priority in PRIORITIES else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
