"""RQ's own tooling against a live batching worker: the commands `rq` sends, and
rq-dashboard's view of the workers."""

from __future__ import annotations

from rq.command import send_stop_job_command
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from worker.client import cancel, enqueue, fetch_job
from worker.contract import Event, EventType, GenerationSpec, events_key

SLOW = {"model": "tiny", "steps": 1000, "sampler": "ddpm"}   # ~10 s on a 2-core CPU


def status(r, job_id: str) -> str:
    return fetch_job(r, job_id).get_status()


def event_types(r, job_id: str) -> list[EventType]:
    return [Event.from_fields(f).type for _, f in r.xrange(events_key(job_id))]


def test_rq_stop_job_command_stops_any_running_job(r, spawn_worker, wait_for) -> None:
    """RQ's stop-job answers only for a worker's one "current job"; this worker runs many,
    and each of them can be stopped with what `rq` sends."""
    w = spawn_worker("--max-batch", "8")
    jobs = [enqueue(r, GenerationSpec(seed=s, **SLOW)) for s in range(3)]
    wait_for(lambda: all(status(r, j.id) == JobStatus.STARTED for j in jobs), 60,
             "all jobs started", w)
    doomed, *others = jobs
    for job in (doomed, others[0]):
        send_stop_job_command(r, job.id, serializer=JSONSerializer)
    for job in (doomed, others[0]):
        wait_for(lambda job=job: status(r, job.id) == JobStatus.STOPPED, 10,
                 f"job {job.id} stopped", w)
        wait_for(lambda job=job: EventType.CANCELED in event_types(r, job.id), 10,
                 "its canceled event", w)
        assert EventType.DONE not in event_types(r, job.id)
    assert status(r, others[1].id) == JobStatus.STARTED, "the other job keeps running"
    assert f"job {doomed.id} stopped" in w.log(), w.log()[-2000:]
    # A job this worker does not run: logged and ignored, the worker carries on.
    send_stop_job_command(r, doomed.id, serializer=JSONSerializer)
    wait_for(lambda: "not running on this worker" in w.log(), 10, "the ignored command", w)
    assert w.proc.poll() is None
    cancel(r, others[1].id)
