"""The wake-gated take (RqSide.take, behind Admission.admit): a busy worker looks at its
queues (an LMOVE per queue, inside the take script) only when work may wait there.

Our enqueues push a wake token, so a job of ours joins a busy batch at the next pass; a job
pushed by plain RQ pushes none and is found by the fallback look every WAKE_TIMEOUT seconds;
with nothing pushed, the passes of a busy worker never look. Each test drives admission
passes of a real in-process worker against a real Redis, with the worker busy on a long
job, and counts what Redis ran (INFO commandstats counts the commands inside scripts too).
The poll interval is set per test (huge: no fallback look can fall in the test; tiny: it
falls soon), and so is WAKE_CHECK, the least time between two looks for a token (0 but in
the test of it), so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from rq import Queue

import worker.admission
from contract.keys import JOB_FUNC, SERIALIZER, queue_name
from contract.queueing import enqueue
from contract.spec import GenerationSpec
from worker.events import Batch
from worker.loop import BatchWorker
from worker.main import build_worker
from worker.settings import WorkerSettings

NEVER = 3600.0          # a poll interval no test lasts
HANG = 60.0             # seconds before a test that waits calls it a hang


def _calls(r: redis.Redis, command: str) -> int:
    stats = r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))  # type: ignore[union-attr]


def _pass(w: BatchWorker) -> None:
    """One admission pass of a busy worker's loop (never blocking: the engine is busy)."""
    w.admission.admit(Batch(), block=False, stopping=lambda: False)


@pytest.fixture
def busy(r: redis.Redis, redis_url: str, models_dir: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A worker running one long 1-image job, with room for more, its queues empty."""

    def make(poll: float, check: float = 0.0) -> BatchWorker:
        monkeypatch.setattr(worker.admission, "WAKE_TIMEOUT", poll)
        monkeypatch.setattr(worker.admission, "WAKE_CHECK", check)
        w = build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir,
                                        device="cpu", max_batch=8, models=["tiny"]))
        made.append(w)
        long = enqueue(r, GenerationSpec(model="tiny", steps=1000, seed=0))
        _pass(w)
        assert w.live.get(long.id) is not None and w.engine.busy and w.engine.room > 0
        return w

    made: list[BatchWorker] = []
    yield make
    for w in made:
        for run in list(w.live):
            w.live.cancel(run, "test over")
        w.writer.close()


def test_busy_passes_with_nothing_pushed_never_look_at_the_queues(r: redis.Redis, busy) -> None:  # type: ignore[no-untyped-def]
    w = busy(NEVER)
    lmove, evalsha = _calls(r, "lmove"), _calls(r, "evalsha")
    passes = 50
    for _ in range(passes):
        _pass(w)
    assert _calls(r, "lmove") == lmove, "a busy pass looked at the queues with no token"
    assert _calls(r, "evalsha") - evalsha <= passes      # the token check: one per pass
    assert len(w.live) == 1


def test_a_job_of_ours_joins_a_busy_batch_at_the_next_pass(r: redis.Redis, busy) -> None:  # type: ignore[no-untyped-def]
    w = busy(NEVER)
    for _ in range(5):
        _pass(w)
    job = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=1))    # pushes a token
    _pass(w)
    assert w.live.get(job.id) is not None


def test_a_busy_worker_looks_for_a_token_at_most_every_check_interval(
        r: redis.Redis, busy, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Within WAKE_CHECK of its last look, a busy pass sends Redis nothing at all, a token
    pushed meanwhile included; the first pass past it takes the job."""
    w = busy(NEVER, check=NEVER)
    evalsha = _calls(r, "evalsha")
    job = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=1))    # pushes a token
    for _ in range(50):
        _pass(w)
    assert _calls(r, "evalsha") == evalsha, "a busy pass looked within the check interval"
    assert w.live.get(job.id) is None
    monkeypatch.setattr(worker.admission, "WAKE_CHECK", 0.0)
    _pass(w)
    assert w.live.get(job.id) is not None


def test_a_job_pushed_by_plain_rq_is_taken_by_the_fallback_look(r: redis.Redis, busy) -> None:  # type: ignore[no-untyped-def]
    w = busy(0.02)
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    job = q.enqueue(JOB_FUNC, kwargs={"model": "tiny", "steps": 2, "seed": 2})   # no token
    deadline = time.monotonic() + HANG
    while w.live.get(job.id) is None:
        assert time.monotonic() < deadline, "a plain RQ job was never taken by a busy worker"
        _pass(w)
        time.sleep(0.005)
