"""The three admission policies (`DDPM_ADMISSION`, worker.settings.ADMISSIONS) in a real
worker on a real Redis: which jobs share a step. A job arrives while another runs, at a
fixed point (right after the running job's first step, enqueued from inside the loop), so
what each policy does with it does not depend on timing. The engine's `step` is only
watched (the real one runs): each step records the jobs that were in it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import get_args

import pytest
import redis
from rq.job import JobStatus

from contract.queueing import enqueue, fetch_job
from contract.spec import GenerationSpec
from worker.engine import StepReport
from worker.main import build_worker
from worker.settings import ADMISSIONS, Admission, WorkerSettings

LONG = 12     # steps of the job that is running when the other arrives


def _spec(seed: int, steps: int, num_images: int = 1) -> GenerationSpec:
    return GenerationSpec(model="tiny", steps=steps, seed=seed, sampler="ddim",
                          num_images=num_images)


def _steps_of(r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable,
              admission: Admission, first: list[GenerationSpec],
              later: GenerationSpec | None = None) -> tuple[list[set[str]], list[str], str]:
    """Run `first` (enqueued before the worker starts) and `later` (enqueued right after
    the first step) to completion; (the job ids stepped at each step, the ids of `first`,
    the id of `later`), with every job finished."""
    ids = [enqueue(r, s).id for s in first]
    w = build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir, device="cpu",
                                    max_batch=8, admission=admission, heartbeat_interval=60,
                                    progress_interval=60))
    real_step = w.engine.step
    stepped: list[set[str]] = []
    late: list[str] = []

    def step() -> StepReport:
        jobs = {j.job_id for j in w.engine.jobs.values() if j.running or j.waiting}
        report = real_step()
        stepped.append(jobs)
        if later is not None and not late:
            late.append(enqueue(r, later).id)
        return report

    w.engine.step = step  # type: ignore[method-assign]
    burst(w)
    for job_id in [*ids, *late]:
        assert fetch_job(r, job_id).get_status() == JobStatus.FINISHED, job_id
    return stepped, ids, late[0] if late else ""


def test_the_policies_are_the_settings_literal() -> None:
    assert ADMISSIONS == get_args(Admission) == ("step", "request", "none")
    assert WorkerSettings().admission == "step"
    assert WorkerSettings(admission="none", max_batch=8).max_batch == 1


@pytest.mark.parametrize("admission", ["step", "request"])
def test_a_job_arriving_mid_batch_joins_it_only_under_step_admission(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable,
        admission: Admission) -> None:
    """Step-level: the newcomer shares the running job's next step. Request-level: it waits
    until the engine is empty, so no step has both, and its first step comes after the
    running job's last."""
    stepped, (running,), newcomer = _steps_of(
        r, redis_url, models_dir, burst, admission, [_spec(1, LONG)], _spec(2, 2))
    both = [k for k, jobs in enumerate(stepped) if {running, newcomer} <= jobs]
    if admission == "step":
        assert both and both[0] == 1, stepped     # admitted at the pass after the arrival
    else:
        assert not both, stepped
        last = max(k for k, jobs in enumerate(stepped) if running in jobs)
        assert min(k for k, jobs in enumerate(stepped) if newcomer in jobs) > last, stepped
        assert last == LONG - 1, stepped         # the running job never waited for it


def test_request_admission_still_fills_an_empty_engine(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable) -> None:
    """Jobs queued while the engine is empty start together (a batch, not one at a time);
    one arriving during their batch waits for all of them, the longest included."""
    first = [_spec(1, 3), _spec(2, LONG), _spec(3, 3, num_images=2)]
    stepped, ids, newcomer = _steps_of(r, redis_url, models_dir, burst, "request", first,
                                       _spec(4, 2))
    assert stepped[0] == set(ids), stepped
    start = min(k for k, jobs in enumerate(stepped) if newcomer in jobs)
    assert all(not (set(ids) & jobs) for jobs in stepped[start:]), stepped
    assert start == LONG, stepped                # right after the longest member's last step


def test_none_admission_runs_one_image_at_a_time(
        r: redis.Redis, redis_url: str, models_dir: Path, burst: Callable) -> None:
    """No batching: every step holds one job (max_batch 1), a 2-image job takes twice its
    steps, and jobs run one after another in queue order."""
    first = [_spec(1, 3, num_images=2), _spec(2, 3)]
    stepped, ids, _ = _steps_of(r, redis_url, models_dir, burst, "none", first)
    assert [len(jobs) for jobs in stepped] == [1] * len(stepped), stepped
    order = [next(iter(jobs)) for jobs in stepped]
    assert order == [ids[0]] * 6 + [ids[1]] * 3, order
