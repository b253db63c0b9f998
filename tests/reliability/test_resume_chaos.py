"""Zero lost work: a drained or SIGKILLed worker's jobs continue from their exact state.

(a) SIGTERM to a worker holding many running multi-step jobs (every sampler,
guidance): it computes at most one more step, stores every job's resume state and re-queues
it, and exits; another worker finishes every job from there. Nothing lost or duplicated,
pixels as an uninterrupted run, and work redone (image-steps computed by all workers /
image-steps the jobs needed) ≤ 1.02. (b) SIGKILL with a checkpoint every N steps: each job
resumes from at most N steps per image back. (c) A damaged or foreign resume state: the job
starts from step 0 and still ends right; so does a job whose state is over
DDPM_RESUME_MAX_BYTES (its requeued event has no `saved_at`).

Steps are counted from the workers' own logs ("stop requested at N image-steps", "worker
stopped after N image-steps"), never from the clock.
"""

from __future__ import annotations

import random
import re
import signal
from typing import Any

import numpy as np
import pytest
import torch
from test_worker_chaos import (
    MAX_PIXEL_DIFF,
    Verdict,
    check_job,
    events,
    image_sizes,
    reference_images,
)

from contract.events import EventType
from contract.keys import resume_key
from contract.queueing import enqueue
from contract.spec import GenerationSpec
from worker.catalog import load_models
from worker.engine import Engine
from worker.resume import encode

STOP_AT = re.compile(r"stop requested at (\d+) image-steps")
STOPPED = re.compile(r"worker stopped after (\d+) image-steps")


def steps_logged(log: str, pattern: re.Pattern[str]) -> int:
    found = pattern.findall(log)
    assert found, f"no {pattern.pattern!r} in the worker's log:\n{log[-3000:]}"
    return int(found[-1])


def mixed_specs(n: int, steps: tuple[int, int], seed: int = 7) -> list[GenerationSpec]:
    """Every sampler, DDIM with η, guidance on the class model; 1-2 images each."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        sampler = ("ddpm", "ddim", "dpm++2m")[k % 3]
        kw: dict[str, Any] = {"model": "tiny", "sampler": sampler,
                              "steps": rng.randint(*steps), "seed": rng.randrange(2**40),
                              "num_images": 1 + k % 2}
        if sampler == "ddim" and k % 2:
            kw["eta"] = 0.5
        if k % 4 == 3:
            kw.update(model="tinycond", class_label=k % 10, guidance_scale=3.0)
        out.append(GenerationSpec(**kw))
    return out


def progress_of(r, job_id: str) -> int:
    """steps_done of the job's last progress event (0 before any)."""
    done = [e.data["steps_done"] for e in events(r, job_id) if e.type == EventType.PROGRESS]
    return int(done[-1]) if done else 0


def check_all(r, models_dir, jobs: dict[str, GenerationSpec]) -> Verdict:
    """Every job finished once, with the pixels of an uninterrupted run."""
    sizes = image_sizes(models_dir)
    verdict = Verdict()
    want = reference_images(models_dir, jobs)
    for job_id, spec in jobs.items():
        images = check_job(r, job_id, spec, sizes=sizes, sigkilled=set(), verdict=verdict)
        if images is None:
            continue
        for i, (got, ref) in enumerate(zip(images, want[job_id], strict=True)):
            diff = int(np.abs(got.astype(int) - ref.astype(int)).max())
            if diff > MAX_PIXEL_DIFF:
                verdict.bad(job_id, f"image {i} differs from an uninterrupted run by {diff}")
    assert not verdict.problems, "\n".join(verdict.problems)
    assert verdict.succeeded == len(jobs) and verdict.duplicated == 0
    return verdict


def finish_on_another_worker(r, spawn_worker, wait_for, ids: list[str], name: str,
                             env: dict[str, str] | None = None) -> int:
    """A fresh worker runs until every job finished, then stops: its image-steps."""
    w = spawn_worker("--max-batch", "32", "--name", name, env=env)
    wait_for(lambda: all(r.hget(f"rq:job:{j}", "status") == b"finished" for j in ids), 300,
             "every job finished by the second worker", w)
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()[-3000:]
    return steps_logged(w.log(), STOPPED)


def test_drain_takes_one_step_and_loses_no_work(r, models_dir, spawn_worker,
                                                wait_for, record) -> None:
    specs = mixed_specs(10, (120, 200))
    jobs = {enqueue(r, s).id: s for s in specs}
    ids = list(jobs)
    # No finishing near the end (0): every running job must leave with its state.
    w = spawn_worker("--max-batch", "32", "--name", "drained",
                     env={"DDPM_GRACE_PERIOD": "120", "DDPM_DRAIN_FINISH_STEPS": "0"})
    wait_for(lambda: all(progress_of(r, j) >= 10 for j in ids), 120,
             "every job 10 steps in", w)
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()[-3000:]
    log = w.log()
    at_stop, at_exit = steps_logged(log, STOP_AT), steps_logged(log, STOPPED)
    running = sum(s.num_images for s in specs)
    # The step in flight, at most: one slot-step per running image.
    assert at_exit - at_stop <= running, (at_stop, at_exit)
    saved = {}
    for j in ids:
        req = [e for e in events(r, j) if e.type == EventType.REQUEUED]
        assert len(req) == 1 and req[0].data.get("saved_at"), (j, req)
        saved[j] = int(req[0].data["saved_at"])
        assert r.exists(resume_key(j))
    assert sum(saved.values()) == at_exit, "the states hold every step computed"

    second = finish_on_another_worker(r, spawn_worker, wait_for, ids, "finisher")
    needed = sum(s.total_steps for s in specs)
    redone = (at_exit + second) / needed
    record(drain_jobs=len(ids), drain_image_steps=at_exit, work_redone=round(redone, 4))
    assert redone <= 1.02, (at_exit, second, needed)
    for j in ids:
        started = [e for e in events(r, j) if e.type == EventType.STARTED]
        assert started[-1].data.get("resumed_at") == saved[j]
        assert not r.exists(resume_key(j)), "a finished job's state is deleted"
    check_all(r, models_dir, jobs)


def test_sigkill_with_checkpoints_redoes_at_most_n_steps_per_image(
        r, models_dir, spawn_worker, wait_for, record) -> None:
    every = 10
    specs = mixed_specs(6, (100, 150), seed=11)
    jobs = {enqueue(r, s).id: s for s in specs}
    ids = list(jobs)
    env = {"DDPM_RESUME_EVERY": str(every)}
    victim = spawn_worker("--max-batch", "32", "--name", "victim", env=env)
    wait_for(lambda: all(progress_of(r, j) >= 3 * every for j in ids), 120,
             "every job past three checkpoints", victim)
    before = {j: progress_of(r, j) for j in ids}     # the victim computed at least this
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    second = finish_on_another_worker(r, spawn_worker, wait_for, ids, "heir", env=env)
    resumed = {}
    for j, spec in jobs.items():
        started = [e for e in events(r, j) if e.type == EventType.STARTED]
        k = started[-1].data.get("resumed_at")
        assert k is not None, f"{j} did not resume: {started[-1].data}"
        assert k >= before[j] - every * spec.num_images, (j, k, before[j])
        resumed[j] = int(k)
    # The heir computed exactly what the states left: resume was honoured, nothing redone.
    assert second == sum(s.total_steps - resumed[j] for j, s in jobs.items())
    lost = sum(before[j] - resumed[j] for j in ids)
    record(checkpoint_every=every, steps_lost_at_most=lost,
           needed=sum(s.total_steps for s in specs))
    check_all(r, models_dir, jobs)


def test_a_damaged_or_foreign_resume_state_restarts_the_job_from_step_0(
        r, models_dir, spawn_worker, wait_for) -> None:
    a = GenerationSpec(model="tiny", sampler="dpm++2m", steps=30, seed=1, num_images=2)
    b = GenerationSpec(model="tiny", sampler="ddim", steps=30, seed=2)
    c = GenerationSpec(model="tiny", sampler="ddpm", steps=20, seed=3)
    jobs = {enqueue(r, s).id: s for s in (a, b, c)}
    ja, jb, _ = jobs
    # Foreign: a real state of another request (c's spec) stored under a's key.
    catalog = load_models(models_dir, torch.device("cpu"))
    engine = Engine(catalog.loaded, device="cpu", max_batch=4)
    engine.admit("other", c)
    for _ in range(5):
        engine.step()
    r.set(resume_key(ja), encode(engine.export("other"), c, catalog.loaded["tiny"].info))
    r.set(resume_key(jb), b"DDPMRS\x01\x00garbage")     # damaged
    for j in (ja, jb):      # as put back by a worker: only a job that ran reads its state
        r.hset(f"rq:job:{j}", "worker_name", "gone-worker")
    w = spawn_worker("--max-batch", "8")
    wait_for(lambda: all(r.hget(f"rq:job:{j}", "status") == b"finished" for j in jobs), 120,
             "every job finished", w)
    for j in (ja, jb):
        started = [e for e in events(r, j) if e.type == EventType.STARTED]
        assert "resumed_at" not in started[-1].data
        assert not r.exists(resume_key(j))
    assert "is not used" in w.log()
    check_all(r, models_dir, jobs)


def test_a_job_over_the_byte_bound_goes_back_without_state_and_restarts(
        r, models_dir, spawn_worker, wait_for) -> None:
    """DDPM_RESUME_MAX_BYTES below a job's state: re-queued from step 0, as before resume,
    its requeued event without `saved_at`; it still ends right."""
    specs = mixed_specs(3, (80, 120), seed=3)
    jobs = {enqueue(r, s).id: s for s in specs}
    ids = list(jobs)
    env = {"DDPM_RESUME_MAX_BYTES": "1000", "DDPM_DRAIN_FINISH_STEPS": "0"}
    w = spawn_worker("--max-batch", "8", env=env)
    wait_for(lambda: all(progress_of(r, j) >= 5 for j in ids), 60, "every job 5 steps in", w)
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0
    for j in ids:
        req = [e for e in events(r, j) if e.type == EventType.REQUEUED]
        assert len(req) == 1 and "saved_at" not in req[0].data
        assert not r.exists(resume_key(j))
    second = finish_on_another_worker(r, spawn_worker, wait_for, ids, "restarter")
    assert second == sum(s.total_steps for s in specs), "each job ran from step 0"
    check_all(r, models_dir, jobs)


@pytest.mark.slow
def test_drain_of_64_jobs_of_200_to_1000_steps(r, models_dir, spawn_worker, wait_for,
                                               record) -> None:
    """The issue's figure: 64 running 32² jobs, 200-1000 steps."""
    specs = [s.model_copy(update={"num_images": 1}) for s in mixed_specs(64, (200, 1000))]
    jobs = {enqueue(r, s).id: s for s in specs}
    ids = list(jobs)
    w = spawn_worker("--max-batch", "64", "--name", "drained",
                     env={"DDPM_GRACE_PERIOD": "600", "DDPM_DRAIN_FINISH_STEPS": "0"})
    wait_for(lambda: all(progress_of(r, j) >= 20 for j in ids), 600, "every job in", w)
    w.signal(signal.SIGTERM)
    assert w.wait(120) == 0
    log = w.log()
    at_stop, at_exit = steps_logged(log, STOP_AT), steps_logged(log, STOPPED)
    assert at_exit - at_stop <= 64
    second = finish_on_another_worker(r, spawn_worker, wait_for, ids, "finisher")
    redone = (at_exit + second) / sum(s.total_steps for s in specs)
    record(drain_jobs=64, work_redone=round(redone, 4))
    assert redone <= 1.02
    check_all(r, models_dir, jobs)
