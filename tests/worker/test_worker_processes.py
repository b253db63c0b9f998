"""`ddpm worker` processes against a real Redis: admission, cancellation, crashes, shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys

from rq import Queue, Worker
from rq.job import JobStatus
from rq.registry import StartedJobRegistry

from contract.events import Event, EventType
from contract.keys import SERIALIZER, events_key, queue_name
from contract.queueing import cancel, enqueue, fetch_job
from contract.spec import GenerationSpec

SLOW = {"model": "tiny", "steps": 1000, "sampler": "ddpm"}   # ~10 s on a 2-core CPU


def status(r, job_id: str) -> str:
    return fetch_job(r, job_id).get_status()


def started(r, job_id: str) -> bool:
    return status(r, job_id) == JobStatus.STARTED


def event_types(r, job_id: str) -> list[EventType]:
    return [Event.from_fields(f).type for _, f in r.xrange(events_key(job_id))]


def test_small_job_overtakes_a_big_one_that_started_first(r, spawn_worker, wait_for) -> None:
    w = spawn_worker("--max-batch", "16")
    big = enqueue(r, GenerationSpec(model="tiny", num_images=4, steps=400, sampler="ddpm",
                                    seed=1))
    wait_for(lambda: started(r, big.id), 60, "the big job to start", w)
    small = enqueue(r, GenerationSpec(model="tiny", steps=5, seed=2))
    wait_for(lambda: status(r, small.id) == JobStatus.FINISHED, 30, "the small job", w)
    assert status(r, big.id) == JobStatus.STARTED, "the small job must not wait for the big one"
    wait_for(lambda: status(r, big.id) == JobStatus.FINISHED, 120, "the big job", w)
    assert fetch_job(r, small.id).ended_at < fetch_job(r, big.id).ended_at


def test_cancel_a_running_job_frees_its_slots(r, spawn_worker, wait_for) -> None:
    w = spawn_worker("--max-batch", "4")
    doomed = enqueue(r, GenerationSpec(num_images=4, seed=1, **SLOW))
    wait_for(lambda: started(r, doomed.id), 60, "the job to start", w)
    # The batch is full (4 of 4 slots): the next job runs only once the slots are freed.
    after = enqueue(r, GenerationSpec(model="tiny", steps=5, num_images=4, seed=2))
    cancel(r, doomed.id)
    wait_for(lambda: EventType.CANCELED in event_types(r, doomed.id), 10, "canceled event", w)
    wait_for(lambda: status(r, after.id) == JobStatus.FINISHED, 30, "the next job", w)
    assert status(r, doomed.id) == JobStatus.CANCELED
    assert EventType.DONE not in event_types(r, doomed.id)
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert StartedJobRegistry(queue=q).count == 0
    assert w.proc.poll() is None, "the worker keeps running"


def test_sigkill_mid_job_another_worker_finishes_everything(r, spawn_worker, wait_for) -> None:
    victim = spawn_worker("--max-batch", "8", "--name", "victim")
    jobs = [enqueue(r, GenerationSpec(model="tiny", steps=300, sampler="ddim", seed=s))
            for s in range(4)]
    wait_for(lambda: all(started(r, j.id) for j in jobs), 60, "all jobs started", victim)
    survivor = spawn_worker("--max-batch", "8", "--name", "survivor")
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    wait_for(lambda: all(status(r, j.id) == JobStatus.FINISHED for j in jobs), 90,
             "every job finished by the survivor", survivor)
    for j in jobs:
        job = fetch_job(r, j.id)
        assert job.worker_name == "survivor"
        assert job.return_value()["num_images"] == 1


def test_sigterm_drains_running_jobs_and_exits_cleanly(r, spawn_worker, wait_for) -> None:
    # One slot: the second job cannot be admitted before the first ends, which is after the
    # SIGTERM (with free slots it could be admitted in the instant before the signal lands).
    # A job within DDPM_DRAIN_FINISH_STEPS of done finishes here rather than going back
    # with its resume state: 1000 makes it this one.
    w = spawn_worker("--max-batch", "1", env={"DDPM_GRACE_PERIOD": "60",
                                              "DDPM_DRAIN_FINISH_STEPS": "1000"})
    job = enqueue(r, GenerationSpec(model="tiny", steps=200, sampler="ddim", seed=1))
    wait_for(lambda: started(r, job.id), 60, "the job to start", w)
    queued = enqueue(r, GenerationSpec(model="tiny", steps=3, seed=2, num_images=4))
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()
    assert status(r, job.id) == JobStatus.FINISHED
    assert status(r, queued.id) == JobStatus.QUEUED, "no new jobs after SIGTERM"
    assert Worker.all(connection=r) == []


def test_sigterm_past_the_grace_period_requeues_and_nothing_is_lost(
        r, spawn_worker, wait_for) -> None:
    w = spawn_worker("--max-batch", "4", env={"DDPM_GRACE_PERIOD": "0.5"})
    job = enqueue(r, GenerationSpec(num_images=2, seed=1, **SLOW))
    wait_for(lambda: started(r, job.id), 60, "the job to start", w)
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.log()
    assert status(r, job.id) == JobStatus.QUEUED
    assert EventType.REQUEUED in event_types(r, job.id)
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert q.job_ids == [job.id] and StartedJobRegistry(queue=q).count == 0
    spawn_worker("--max-batch", "4")
    wait_for(lambda: status(r, job.id) == JobStatus.FINISHED, 90, "the re-queued job", w)


def test_rq_sees_every_execution_while_jobs_run(r, redis_url, spawn_worker, wait_for) -> None:
    w = spawn_worker("--max-batch", "8", "--name", "batcher")
    jobs = [enqueue(r, GenerationSpec(seed=s, **SLOW)) for s in range(3)]
    wait_for(lambda: all(started(r, j.id) for j in jobs), 60, "all jobs started", w)
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert sorted(StartedJobRegistry(queue=q).get_job_ids()) == sorted(j.id for j in jobs)
    (rq_worker,) = Worker.all(connection=r)
    assert rq_worker.name == "batcher" and rq_worker.get_state() == "busy"
    assert sorted(e.job_id for e in rq_worker.get_current_executions()) == \
        sorted(j.id for j in jobs)
    out = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", redis_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert queue_name("tiny") in out.stdout and "batcher" in out.stdout, out.stdout
    assert "1 workers" in out.stdout, out.stdout
    for j in jobs:
        cancel(r, j.id)


def test_the_worker_runs_torch_on_the_cpu_threads_it_is_given(spawn_worker, wait_for) -> None:
    """DDPM_TORCH_THREADS reaches torch in the worker (`ddpm serve` sets it to leave half
    the CPUs to the API): a count torch would never choose by itself (one more than the
    cores)."""
    import os

    n = (os.cpu_count() or 1) + 1
    w = spawn_worker(env={"DDPM_TORCH_THREADS": str(n)})
    wait_for(lambda: "serving" in w.log(), 60, "the worker to start", w)
    assert f"{n} CPU threads" in w.log(), w.log()
