"""The window between taking a job and marking it started, made deterministic, and the
guard of `worker.tasks` against plain RQ workers.

Starting is one guarded Lua script (jobs.RqJobs.start, behind RqSide.start; rqside/layout.py):
each job's writes run only if, when the script runs, the job is neither canceled nor gone. A
check made in Python before the writes are sent (as RQ's WATCH-less path would) loses a
cancel that lands in between; so does writing unguarded. In-process worker, real Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.executions import ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from contract.events import Event, EventType
from contract.keys import SERIALIZER, events_key, queue_name
from contract.queueing import cancel, enqueue, fetch_job
from contract.spec import GenerationSpec
from worker.main import build_worker
from worker.settings import WorkerSettings


def _worker(redis_url: str, models_dir: Path):  # type: ignore[no-untyped-def]
    return build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir,
                                       device="cpu", max_batch=8, progress_interval=0.0))


def _types(r: redis.Redis, job_id: str) -> list[EventType]:
    return [Event.from_fields(f).type for _, f in r.xrange(events_key(job_id))]


def _queue(r: redis.Redis) -> Queue:
    return Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)


def test_a_cancel_landing_after_the_writes_are_recorded_still_wins(
        r: redis.Redis, redis_url: str, models_dir: Path) -> None:
    """The cancel reaches Redis after the start writes were built, just before the script
    runs them: the guard is evaluated inside the script, so the job is not started; the
    loop frees nothing for it, announces the cancellation and admits the other jobs."""
    jobs = [enqueue(r, GenerationSpec(model="tiny", steps=2, seed=s)) for s in range(3)]
    w = _worker(redis_url, models_dir)
    taken, bad = w.rq.take(8)
    assert not bad and taken == [j.id for j in jobs]
    layout = w.rq.jobs._layout
    run_script = layout._start

    def cancel_then_run(**kwargs: Any) -> Any:
        cancel(r, jobs[1].id)                 # in the window, after the writes were built
        return run_script(**kwargs)

    layout._start = cancel_then_run
    try:
        w.admission.start(taken)
    finally:
        layout._start = run_script
    w.writer.close()                          # flush the events the start wrote
    assert fetch_job(r, jobs[1].id).get_status() == JobStatus.CANCELED
    assert w.live.get(jobs[1].id) is None
    assert sorted(run.id for run in w.live) == sorted([jobs[0].id, jobs[2].id])
    assert sorted(w.engine.jobs) == sorted([jobs[0].id, jobs[2].id])
    assert jobs[1].id not in StartedJobRegistry(queue=_queue(r)).get_job_ids()
    assert ExecutionRegistry(jobs[1].id, r).get_execution_ids() == []
    assert _types(r, jobs[1].id) == [EventType.CANCELED]
    assert _types(r, jobs[0].id) == [EventType.STARTED]
    for run in list(w.live):
        w.live.cancel(run, "test over")


def test_a_job_deleted_between_take_and_start_is_not_recreated(
        r: redis.Redis, redis_url: str, models_dir: Path) -> None:
    """A job hash deleted in the window stays deleted: the start writes (HSET, PERSIST...)
    would otherwise bring back a hash of nothing but started-fields, forever."""
    jobs = [enqueue(r, GenerationSpec(model="tiny", steps=2, seed=s)) for s in range(2)]
    w = _worker(redis_url, models_dir)
    taken, _ = w.rq.take(8)
    r.delete(Job.key_for(jobs[0].id))
    started, canceled = w.rq.start(taken)
    assert [s.job_id for s in started] == [jobs[1].id]
    assert canceled == [jobs[0].id]
    assert not r.exists(Job.key_for(jobs[0].id))
    assert r.llen(_queue(r).intermediate_queue_key) == 0
    for s in started:
        w.rq.release(s.job_id)


def test_a_plain_rq_worker_fails_a_generation_job_and_says_why(
        r: redis.Redis, burst: Callable[[Any], bool]) -> None:
    """`rq worker` on our queues would run `worker.tasks.generate` itself, one request at a
    time behind the batching workers' backs: it must fail the job with the reason."""
    job = enqueue(r, GenerationSpec(model="tiny", steps=2), retries=0)
    plain = SimpleWorker([_queue(r)], connection=r, serializer=SERIALIZER)
    burst(plain)
    job = fetch_job(r, job.id)
    assert job.get_status() == JobStatus.FAILED
    result = job.latest_result()
    assert result is not None and result.exc_string is not None
    assert "run on `ddpm worker`" in result.exc_string, result.exc_string
