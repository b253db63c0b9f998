"""The start and success scripts (worker/rqside/layout.py) write what RQ's own methods write.

The same job is started and succeeded twice on a live worker: once by RQ's methods, as
RQ's worker calls them (Execution.create, Job.heartbeat, prepare_for_execution, the
worker's heartbeat and state; BaseWorker.handle_job_success), once by the RQ side's
scripts. Every `rq:*` key each run leaves, after the start and after the success, compares
field by field: names, values (timestamps as set or not), types, TTLs, registry members and
scores. Unlike test_rq_conformance.py (which looks after the worker has left), this sees
what a live worker holds: its executions set, its counters, half-way state.
"""

from __future__ import annotations

import re
import time
from typing import Any

import redis
from rq.executions import Execution
from rq.utils import now
from rq.worker.base import WorkerStatus

from contract.queueing import enqueue
from contract.spec import GenerationSpec
from worker.rqside import RqSide

TOL = 5.0           # seconds two runs' TTLs and scores may differ by
STAMPS = {"created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat",
          "execution_started_at", "execution_ended_at", "total_working_time", "birth"}
RESULT = {"model": "tiny", "num_images": 1, "image_keys": ["ddpm:img:x:0"]}
META = {"progress": 1.0, "steps_done": 2}


def _side(r: redis.Redis, queue: str) -> RqSide:
    side = RqSide(r, [queue], name="layout", worker_ttl=60, maintenance_interval=600,
                  heartbeat_interval=5, execution_ttl=90, result_ttl=3600, notify=None,
                  on_stop_job=lambda job_id: None)
    side.worker.register_birth()
    return side


def _snapshot(r: redis.Redis, job_id: str) -> dict[str, Any]:
    """Every rq:* key: type, TTL and content, the job id as <job>, execution ids (32 hex
    digits) as <execution>, timestamps as whether they are set."""
    at = time.time()

    def name(v: bytes | str) -> str | bytes:
        text = v.decode() if isinstance(v, bytes) else v
        return re.sub(r"\b[0-9a-f]{32}\b", "<execution>", text.replace(job_id, "<job>"))

    def value(field: str, v: bytes) -> Any:
        if field in STAMPS:
            return bool(v)
        try:
            return name(v)
        except UnicodeDecodeError:
            return v

    out: dict[str, Any] = {}
    for raw in sorted(r.scan_iter("rq:*")):
        kind = r.type(raw).decode()
        state: dict[str, Any] = {"type": kind, "ttl": r.ttl(raw)}
        if kind == "hash":
            state["fields"] = {k.decode(): value(k.decode(), v)
                               for k, v in r.hgetall(raw).items()}
        elif kind == "zset":
            state["members"] = {name(m): s - at for m, s in r.zrange(raw, 0, -1, withscores=True)}
        elif kind == "set":
            state["members"] = sorted(str(name(m)) for m in r.smembers(raw))
        elif kind == "list":
            state["members"] = [name(m) for m in r.lrange(raw, 0, -1)]
        elif kind == "stream":
            state["entries"] = [{k.decode(): value(k.decode(), v) for k, v in e.items()}
                                for _, e in r.xrange(raw)]
        out[str(name(raw))] = state
    return out


def _assert_same(ours: dict[str, Any], rqs: dict[str, Any], when: str) -> None:
    assert sorted(ours) == sorted(rqs), f"{when}: keys {sorted(ours)}, RQ's {sorted(rqs)}"
    for key, want in rqs.items():
        got = ours[key]
        assert got["type"] == want["type"], (when, key)
        ttls = (got["ttl"], want["ttl"])
        assert ttls[0] == ttls[1] if min(ttls) < 0 else abs(ttls[0] - ttls[1]) <= TOL, \
            f"{when} {key}: TTL {got['ttl']}, RQ's {want['ttl']}"
        if want["type"] == "zset":
            assert got["members"].keys() == want["members"].keys(), (when, key, got, want)
            for m, score in want["members"].items():
                assert abs(got["members"][m] - score) <= TOL, (when, key, m, got, want)
        else:
            assert {k: v for k, v in got.items() if k != "ttl"} == \
                {k: v for k, v in want.items() if k != "ttl"}, f"{when} {key}"


def _run(r: redis.Redis, ours: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start then succeed one job on a live worker, by the scripts or by RQ's methods; the
    keyspace after each."""
    r.flushall()
    job_id = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=1)).id
    r.expire(f"rq:job:{job_id}", 500)       # as RQ's `ttl=` (a queued job's lifetime)
    side = _side(r, r.hget(f"rq:job:{job_id}", "origin").decode())  # type: ignore[union-attr]
    taken, _ = side.take(1)
    assert taken == [job_id]
    if ours:
        started, _ = side.start(taken)
        assert [s.job_id for s in started] == [job_id]
    else:
        run, w = side._runs[job_id], side.worker
        with r.pipeline() as p:
            p.lrem(run.queue.intermediate_queue_key, 1, job_id)
            run.execution = Execution.create(run.job, w.execution_ttl, pipeline=p,
                                             worker_name=w.name)
            run.job.heartbeat(now(), w.execution_ttl, pipeline=p)
            run.job.prepare_for_execution(w.name, pipeline=p)
            p.persist(run.job.key)
            w.heartbeat(w.execution_ttl, pipeline=p)
            w.set_state(WorkerStatus.BUSY, pipeline=p)
            p.execute()
    after_start = _snapshot(r, job_id)
    if ours:
        side.meta_at_success(job_id, **META)
        side.succeed({job_id: RESULT})
    else:
        job = run.job
        job.meta.update(META)
        job.save_meta()
        job.ended_at, job._result = now(), RESULT
        w.handle_job_success(job, run.queue, run.queue.started_job_registry, run.execution)
    return after_start, _snapshot(r, job_id)


def test_start_and_success_scripts_write_what_rqs_methods_write(r: redis.Redis) -> None:
    rq_start, rq_end = _run(r, ours=False)
    our_start, our_end = _run(r, ours=True)
    _assert_same(our_start, rq_start, "after the start")
    _assert_same(our_end, rq_end, "after the success")
    # What the comparison covered, as RQ wrote it.
    assert rq_start["rq:job:<job>"]["fields"]["status"] == "started"
    assert rq_start["rq:worker:layout:executions"]["members"] == ["<job>:<execution>"]
    assert rq_end["rq:job:<job>"]["fields"]["status"] == "finished"
    assert "rq:worker:layout:executions" not in rq_end
    assert rq_end["rq:worker:layout"]["fields"]["successful_job_count"] == "1"
    assert rq_end["rq:results:<job>"]["entries"][0]["execution_id"] == "<execution>"
