"""The atomic dequeue, in CI: a worker SIGKILLed right after taking jobs loses none.

A short, deterministic version of tests/reliability/test_worker_chaos.py's admission test
(`make reliability`): a process takes jobs with the worker's own take (RqJobs.take) and
kills itself with SIGKILL before marking them started, exactly where RQ's plain
multi-queue LPOP lost jobs for good. The jobs must wait in their queue's intermediate list,
and a live worker's maintenance must bring them back and run them. RQ re-queues a job
there once it has been seen for a minute; the test moves that first sighting back a minute
instead of waiting.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.intermediate_queue import IntermediateQueue
from rq.job import JobStatus
from rq.utils import now

from contract.keys import SERIALIZER, queue_name
from contract.limits import PRIORITIES
from contract.queueing import enqueue, fetch_job
from contract.spec import GenerationSpec
from worker.main import build_worker
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]

# The take of a worker serving `tiny`, then SIGKILL. No torch: RqJobs needs only the
# worker's connection, job class and serializer.
TAKE_THEN_DIE = """
import os, signal, sys, types
import redis
from rq.queue import Queue
from rq.serializers import JSONSerializer
from worker.rqside.jobs import BatchJob, RqJobs
r = redis.Redis.from_url(sys.argv[1])
worker = types.SimpleNamespace(connection=r, job_class=BatchJob, serializer=JSONSerializer)
queues = [Queue(name, connection=r, serializer=JSONSerializer) for name in sys.argv[2:]]
taken, bad = RqJobs(worker).take(queues, 64)
print(" ".join(job.id for job, _ in taken), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_jobs_taken_by_a_worker_killed_before_starting_them_come_back(
        r: redis.Redis, redis_url: str, models_dir: Path,
        burst: Callable[[Any], bool]) -> None:
    ids = [enqueue(r, GenerationSpec(model="tiny", steps=2, seed=s)).id for s in range(3)]
    names = [queue_name("tiny", p) for p in PRIORITIES]
    child = subprocess.run([sys.executable, "-c", TAKE_THEN_DIE, redis_url, *names],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.split() == ids, "the dying worker took every job"

    queue = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    assert queue.job_ids == []
    held = IntermediateQueue(queue.key, r)
    assert held.get_job_ids() == ids, "taken jobs wait in the intermediate list"

    def live_worker():  # type: ignore[no-untyped-def]
        return build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir,
                                           device="cpu", max_batch=8))

    maintainer = live_worker()                # a live worker's maintenance pass:
    maintainer.clean_registries()             # RQ notes when it first saw each job there
    a_minute_ago = (now() - timedelta(minutes=1, seconds=5)).timestamp()
    for job_id in ids:
        assert r.set(held.get_first_seen_key(job_id), a_minute_ago, xx=True)
    maintainer.clean_registries()             # ... and gives them back (RQ Retry)
    assert held.get_job_ids() == []
    assert sorted(queue.job_ids) == sorted(ids)
    burst(live_worker())
    assert [fetch_job(r, j).get_status() for j in ids] == [JobStatus.FINISHED] * 3
