"""RQ bookkeeping per step, not per job: what it costs in round-trips, and that batching it
loses none of RQ's guarantees (a cancel is never overwritten, dependents are enqueued)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from rq import Queue
from rq.job import JobStatus
from rq.registry import StartedJobRegistry

from contract.events import Event, EventType
from contract.keys import (
    JOB_FUNC,
    SERIALIZER,
    events_key,
    image_key,
    queue_name,
    resume_key,
)
from contract.queueing import cancel, enqueue, fetch_job, job_key
from contract.spec import GenerationSpec
from worker.main import build_worker
from worker.redis_batch import SCRIPT, PackedScript, WriteBatch
from worker.settings import WorkerSettings


def _worker(redis_url: str, models_dir: Path, **settings: object):  # type: ignore[no-untyped-def]
    return build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir,
                                       device="cpu", **{"max_batch": 8, **settings}))


def events(r: redis.Redis, job_id: str) -> list[Event]:
    return [Event.from_fields(f) for _, f in r.xrange(events_key(job_id))]


class Monitor:
    """The commands clients send to Redis (MONITOR), without those a script runs inside."""

    STOP = "test-monitor-stop"

    def __init__(self, redis_url: str) -> None:
        self.commands: list[str] = []
        self.runs: list[list[str]] = []     # each top-level command with those its script ran
        self._client = redis.Redis.from_url(redis_url)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "MONITOR did not start"

    def _run(self) -> None:
        with self._client.monitor() as m:
            self._ready.set()
            for cmd in m.listen():
                text = cmd["command"]
                if text == f"ECHO {self.STOP}":
                    return
                if cmd.get("client_type") != "lua":
                    self.commands.append(text)
                    self.runs.append([text])
                elif self.runs:
                    self.runs[-1].append(text)

    def stop(self) -> list[str]:
        self._client.echo(self.STOP)
        self._thread.join(10)
        assert not self._thread.is_alive(), "MONITOR did not stop"
        return self.commands


def _commands_for(r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable,
                  n: int) -> list[str]:
    """What one worker sends Redis to run `n` one-image jobs that start, step and finish
    together (max batch n, so the same number of steps whatever n)."""
    r.flushall()
    jobs = [enqueue(r, GenerationSpec(model="tiny", steps=3, seed=s, sampler="ddim"))
            for s in range(n)]
    w = _worker(redis_url, models_dir, max_batch=n, heartbeat_interval=60,
                progress_interval=60)
    mon = Monitor(redis_url)
    burst(w)
    commands = mon.stop()
    assert all(fetch_job(r, j.id).get_status() == JobStatus.FINISHED for j in jobs)
    return commands


def test_a_step_of_many_jobs_costs_round_trips_per_step_not_per_job(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable) -> None:
    """RQ's bookkeeping, events, images and results of the jobs of a step take a few
    commands per step, whatever the number of jobs: 24 more jobs cost fewer than 24 more
    commands (RQ's own per-job path took ~20 round-trips per job: fetch, execution,
    WATCH/MULTI/EXEC to start, heartbeat, WATCH/SMEMBERS/MULTI/EXEC to finish, events one
    by one). The worker's start-up and maintenance are the same in both runs."""
    few = _commands_for(r, redis_url, models_dir, burst, 8)
    many = _commands_for(r, redis_url, models_dir, burst, 32)
    assert len(many) - len(few) < 32 - 8, \
        f"{len(few)} commands for 8 jobs, {len(many)} for 32: {many}"
    # The bookkeeping went through scripts: no per-job transaction is left.
    assert not any(c.startswith("WATCH") for c in many), many


def test_a_jobs_last_images_are_announced_in_the_write_of_its_done(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable) -> None:
    """The `image` events of a job's last step and its last `progress` go to Redis in the
    script run that writes its `done` (a reader blocked on the stream wakes once for the
    three, not twice), after its images are stored; an image finished at an earlier step
    is announced at once. 3 images at max batch 2: images 0 and 1 end at step 2 (announced
    then), image 2 at step 4 (announced with `done`). The client reads every event, in the
    order it always had."""
    job = enqueue(r, GenerationSpec(model="tiny", num_images=3, steps=2, seed=5,
                                    sampler="ddim"))
    w = _worker(redis_url, models_dir, max_batch=2, heartbeat_interval=60,
                progress_interval=60)
    mon = Monitor(redis_url)
    burst(w)
    mon.stop()
    assert fetch_job(r, job.id).get_status() == JobStatus.FINISHED
    key = events_key(job.id)

    def writes(run: list[str]) -> list[str]:
        """The job's events (an image's with its index) and images a script run wrote."""
        out = []
        for c in run:
            if c.startswith(f"XADD {key} "):
                kind, data = c.split(" type ", 1)[1].split(" data ", 1)
                out.append(f"image {json.loads(data)['index']}" if kind == "image" else kind)
            elif c.startswith(f"SET {image_key(job.id, 0)[:-1]}"):
                out.append(f"stored {c.split()[1].rsplit(':', 1)[1]}")
        return out

    runs = [w for w in map(writes, mon.runs) if w]
    assert runs == [["started"], ["stored 0", "image 0", "stored 1", "image 1"],
                    ["stored 2"], ["image 2", "progress", "done"]]
    assert [e.type for e in events(r, job.id)] == [
        EventType.STARTED, EventType.IMAGE, EventType.IMAGE, EventType.IMAGE,
        EventType.PROGRESS, EventType.DONE]


def test_only_a_job_that_ran_before_reads_a_resume_state(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable) -> None:
    """A fresh job without input images has nothing stored to read: its admission sends no
    MGET. A job whose RQ hash names a worker (it was started before, here or elsewhere, and
    put back: worker/drain.py stores its state then) reads its resume key at its start."""
    fresh = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=1))
    mon = Monitor(redis_url)
    burst(_worker(redis_url, models_dir))
    commands = mon.stop()
    assert fetch_job(r, fresh.id).get_status() == JobStatus.FINISHED
    assert not [c for c in commands if c.startswith("MGET")], commands
    again = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=2))
    r.hset(job_key(again.id), "worker_name", "gone-worker")
    mon = Monitor(redis_url)
    burst(_worker(redis_url, models_dir))
    commands = mon.stop()
    assert fetch_job(r, again.id).get_status() == JobStatus.FINISHED
    assert [c for c in commands if c.startswith("MGET")] == [f"MGET {resume_key(again.id)}"]


def test_a_cancel_between_take_and_start_is_kept(r: redis.Redis, redis_url: str,
                                                 models_dir: Path, burst: Callable) -> None:
    """The window between taking jobs off the queue and marking them started, made
    deterministic: the job canceled in it stays canceled, the others start and finish."""
    jobs = [enqueue(r, GenerationSpec(model="tiny", steps=2, seed=s)) for s in range(3)]
    w = _worker(redis_url, models_dir)
    taken, bad = w.rq.take(8)
    assert not bad and taken == [j.id for j in jobs]
    cancel(r, jobs[1].id)
    started, canceled = w.rq.start(taken)
    assert [s.job_id for s in started] == [jobs[0].id, jobs[2].id]
    assert canceled == [jobs[1].id]
    assert fetch_job(r, jobs[1].id).get_status() == JobStatus.CANCELED
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert r.llen(q.intermediate_queue_key) == 0, "every taken job leaves the list"
    registry = StartedJobRegistry(queue=q)
    assert sorted(registry.get_job_ids()) == sorted([jobs[0].id, jobs[2].id])
    for s in started:                  # back to the queue, for a worker to run them
        w.rq.requeue(s.job_id)
    burst(_worker(redis_url, models_dir))
    assert [fetch_job(r, j.id).get_status() for j in jobs] == \
        [JobStatus.FINISHED, JobStatus.CANCELED, JobStatus.FINISHED]


def test_dependents_of_a_batched_success_are_enqueued(r: redis.Redis, redis_url: str,
                                                      models_dir: Path, burst: Callable) -> None:
    """RQ lets anyone make a job depend on ours; the batched success must still move it to
    its queue (the script checks for dependents where it writes the success)."""
    parent = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=1))
    plain = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=2))
    other = Queue("other", connection=r, serializer=SERIALIZER)
    child = other.enqueue(JOB_FUNC, kwargs={}, depends_on=parent)
    assert child.get_status() == JobStatus.DEFERRED
    burst(_worker(redis_url, models_dir))
    assert fetch_job(r, parent.id).get_status() == JobStatus.FINISHED
    assert fetch_job(r, plain.id).get_status() == JobStatus.FINISHED
    assert child.get_status(refresh=True) == JobStatus.QUEUED
    assert other.job_ids == [child.id]


def test_write_batch_runs_each_group_only_where_its_guard_holds(r: redis.Redis) -> None:
    run = r.register_script(SCRIPT)
    r.hset("job:a", "status", "started")
    r.hset("job:b", "status", "canceled")
    r.sadd("deps:b", "x")
    wb = WriteBatch(r)
    wb.group().set("plain", b"\x00\xffbytes")
    wb.group("not-canceled", "job:a").hset("job:a", mapping={"w": "1", "n": 2})
    wb.group("not-canceled", "job:b").hset("job:b", "w", "1")
    wb.group("not-canceled", "job:gone").hset("job:gone", "w", "1")
    wb.group("absent", "deps:a").rpush("ran", "a")
    wb.group("absent", "deps:b").rpush("ran", "b")
    assert wb.run(run) == [True, True, False, False, True, False]
    assert r.get("plain") == b"\x00\xffbytes"
    assert r.hgetall("job:a") == {b"status": b"started", b"w": b"1", b"n": b"2"}
    assert r.hget("job:b", "w") is None and not r.exists("job:gone")
    assert r.lrange("ran", 0, -1) == [b"a"]
    assert len(wb) == 0 and wb.run(run) == []


def test_a_packed_script_sends_what_redis_pys_own_packing_sends(r: redis.Redis) -> None:
    """The RQ side's and the writer's scripts have their arguments packed by hiredis in one
    call: Redis gets exactly what redis-py's own EVALSHA sends, for every type of argument
    they pass; a script Redis does not have is loaded; a type redis-py refuses is refused."""
    script = "return {KEYS[1], KEYS[2], unpack(ARGV)}"
    keys = ["k1", "k2"]
    args = ["text", "é", b"\x00\xffbytes", 3, -7, 10**20, 2.5, 0.1, 1e20, 1 / 3]
    r.script_flush()
    packed = PackedScript(r, script)
    got = packed(keys=keys, args=args)
    assert got == r.register_script(script)(keys=keys, args=args)
    assert got[2:] == [b"text", "é".encode(), b"\x00\xffbytes", b"3", b"-7",
                       str(10**20).encode(), b"2.5", b"0.1", b"1e+20", repr(1 / 3).encode()]
    with pytest.raises(redis.DataError):
        packed(keys=keys, args=[True])


class _OutOfMemory:
    """A network that is out of memory for any batch, one row included (what a GPU too
    small for the model does): a real torch.OutOfMemoryError, raised by the forward."""

    def __call__(self, x, t, y=None):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory (test)")


def test_out_of_memory_at_one_row_fails_that_models_jobs_not_the_worker(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable) -> None:
    """The engine halves its chunk down to one row, then gives up: the jobs of that model
    fail with the reason (retries exhausted), the other model's job in the same steps
    finishes, and the worker lives on to run its queues empty."""
    w = _worker(redis_url, models_dir)
    w.engine._batches["tiny"].forward.net = _OutOfMemory()
    oom = enqueue(r, GenerationSpec(model="tiny", num_images=2, steps=3, seed=1), retries=0)
    fine = enqueue(r, GenerationSpec(model="tinycond", steps=3, seed=2, class_label=1))
    burst(w)
    assert fetch_job(r, oom.id).get_status() == JobStatus.FAILED
    assert "out of memory" in fetch_job(r, oom.id).latest_result().exc_string
    assert fetch_job(r, fine.id).get_status() == JobStatus.FINISHED
    evs = events(r, oom.id)
    errors = [e for e in evs if e.type == EventType.ERROR]
    assert len(errors) == 1 and "out of memory" in errors[0].data["message"]
    # The job failed in the pass that started it: its `started` is written first and the
    # error last (readers stop at the terminal event).
    assert [e.type for e in evs] == [EventType.STARTED, EventType.ERROR]
