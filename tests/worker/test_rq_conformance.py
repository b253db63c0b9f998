"""Our worker writes RQ's Redis layout as RQ's own worker does: the same jobs, run once by
RQ's `SimpleWorker` (its job function a stand-in, rq_reference.py) and once by `ddpm worker`'s
BatchWorker, leave the same `rq:*` keys, field by field: the job hashes, the registries, the
results streams, the worker's hash and every key's TTL. The differences we mean are listed
once, in `DELIBERATE`, and compared as such; anything else RQ writes and we do not (or the
other way round) fails here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import rq_reference
from rq_reference import Snapshot, epoch, run_in_burst, run_reference, snapshot

from contract.keys import events_key
from contract.queueing import enqueue
from contract.spec import GenerationSpec
from worker.main import build_worker
from worker.settings import WorkerSettings

RESULT_TTL = 24 * 3600       # contract.queueing.enqueue's default result (and failure) TTL
TOL = 30.0                   # seconds two runs' TTLs and registry scores may differ by

# What our worker writes differently from RQ's, on purpose. Each entry is applied by name in
# `assert_conforms` below; nothing else may differ.
DELIBERATE = {
    # The job's function: RQ's worker runs rq_reference.generate, ours never calls
    # worker.tasks.generate. Only the hash's `data` field holds it (swap_function).
    "job.data": "the function name inside the payload",
    # Our worker stores its progress in RQ's job meta (rq-dashboard and `Job.meta` show it);
    # RQ's worker writes no meta unless the job function saves some.
    "job.meta": "meta.progress, steps_done, images_done, image_steps (our worker only)",
    # The result's two durations are measured by our worker; the stand-in returns 0.0.
    "result.queue_wait_s": "measured (ours) vs 0.0 (reference)",
    "result.run_s": "measured (ours) vs 0.0 (reference)",
    # A failed job's exc_string: RQ records the job function's traceback, ours the reason
    # (no Python frame of ours is the cause of a bad spec).
    "result.exc_string": "a traceback (RQ) vs the reason (ours): both non-empty",
    # The group-maintenance lock (rq:clean_groups) expires just before our next maintenance
    # pass (worker/rqside/) instead of after RQ's fixed ~10 min.
    "rq:clean_groups.ttl": "the lock's TTL",
    # The worker's hash: the same fields, queues and job counts; `total_working_time` sums
    # measured durations, so only its presence and sign compare.
    "worker.total_working_time": "measured durations",
    # Not chosen, known: after a burst our worker's hash says `busy` (its loop leaves before
    # setting `idle`), RQ's `idle`. Nothing reads a dead worker's state (`death` is set, the
    # hash expires in 60 s); either is accepted here until the loop sets idle on its way out.
    "worker.state": "busy or idle at a burst's end (RQ: idle)",
}

# Job hash fields compared by value (the timestamps are compared by order below).
EXACT_FIELDS = ("status", "worker_name", "origin", "result_ttl", "failure_ttl", "timeout",
                "retries_left", "retry_intervals", "description", "group_id",
                "success_callback_name", "failure_callback_name", "stopped_callback_name")
TIMESTAMPS = ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat")
WORKER_STATS = ("successful_job_count", "failed_job_count")


def run_both(r: redis.Redis, redis_url: str, models_dir: Path,
             make_jobs: Callable[[redis.Redis], list[str]],
             reference: Callable[..., Any]) -> tuple[Snapshot, Snapshot]:
    """The jobs `make_jobs` enqueues, run by RQ's worker (their function swapped for
    `reference`) on an empty Redis, then by ours on another empty Redis (the same one,
    flushed): each run's snapshot."""
    r.flushall()
    ids = make_jobs(r)
    for job_id in ids:
        rq_reference.swap_function(r, job_id, reference)
    ref = snapshot(r, ids, run_reference(r, "tiny"))
    r.flushall()
    ids = make_jobs(r)
    worker = build_worker(WorkerSettings(redis_url=redis_url, models_dir=models_dir,
                                         device="cpu", max_batch=8, models=["tiny"]))
    run_in_burst(worker)
    return ref, snapshot(r, ids, worker.name)


def ttl_matches(ref: int, ours: int) -> bool:
    return ref == ours if ref < 0 or ours < 0 else abs(ref - ours) <= TOL


def assert_conforms(ref: Snapshot, ours: Snapshot, n_jobs: int) -> None:
    """Every rq:* key of `ref` in `ours` and no other, with the same type and TTL and the
    same content, save for DELIBERATE."""
    assert sorted(ours.keys) == sorted(ref.keys), \
        f"RQ's worker left {sorted(ref.keys)}, ours {sorted(ours.keys)}"
    for key, want in ref.keys.items():
        got = ours.keys[key]
        assert got["type"] == want["type"], f"{key}: {got['type']} instead of {want['type']}"
        if key != "rq:clean_groups":          # DELIBERATE["rq:clean_groups.ttl"]
            assert ttl_matches(want["ttl"], got["ttl"]), \
                f"{key}: TTL {got['ttl']} where RQ's is {want['ttl']}"
        if want["type"] in ("zset",):
            assert got["members"].keys() == want["members"].keys(), \
                f"{key}: members {sorted(got['members'])}, RQ's {sorted(want['members'])}"
            for m, score in want["members"].items():     # scores relative to the snapshot
                assert abs(got["members"][m] - score) <= TOL, \
                    f"{key}[{m}]: score now{got['members'][m]:+.0f} s, RQ's now{score:+.0f} s"
        elif want["type"] in ("list", "set"):
            assert got["members"] == want["members"], f"{key}: {got['members']}"
    for snap in (ref, ours):              # executions and RQ's intermediate lists cleaned
        left = [k for k in snap.keys if k.startswith(("rq:executions:", "rq:execution:",
                                                      "rq:wip:", "rq:started:"))
                or k.endswith(":intermediate")]
        assert not left, f"left behind: {left}"
    for i in range(n_jobs):
        assert_job_conforms(ref, ours, f"<job{i}>")
    assert_worker_conforms(ref, ours)


def assert_job_conforms(ref: Snapshot, ours: Snapshot, job: str) -> None:
    want = ref.key(f"rq:job:{job}")["fields"]
    got = ours.key(f"rq:job:{job}")["fields"]
    extra = {"meta"} - set(want)                 # DELIBERATE["job.meta"]
    assert set(got) - extra == set(want), \
        f"{job}: fields {sorted(got)}; RQ's worker writes {sorted(want)}"
    if "meta" in extra & set(got):
        assert 0 <= json.loads(got["meta"])["progress"] <= 1, got["meta"]
    for f in EXACT_FIELDS:
        assert got.get(f) == want.get(f), f"{job}.{f}: {got.get(f)!r}, RQ's {want.get(f)!r}"
    for f in TIMESTAMPS:                         # set (or empty) alike
        assert bool(got.get(f)) == bool(want.get(f)), \
            f"{job}.{f}: {got.get(f)!r}, RQ's {want.get(f)!r}"
    for fields in (want, got):
        stamps = [epoch(fields[f]) for f in ("enqueued_at", "started_at", "ended_at")
                  if fields.get(f)]
        assert stamps == sorted(stamps), f"{job}: enqueued ≤ started ≤ ended: {fields}"
        # RQ's own last heartbeat comes a few µs after ended_at: only its lower bound holds.
        assert epoch(fields["started_at"]) <= epoch(fields["last_heartbeat"]), fields
    results = f"rq:results:{job}"
    if results not in ref.keys:
        return
    want_entries, got_entries = ref.keys[results]["entries"], ours.keys[results]["entries"]
    assert len(got_entries) == len(want_entries), f"{results}: {got_entries}"
    for w, g in zip(want_entries, got_entries, strict=True):
        assert set(g) == set(w), f"{results}: fields {sorted(g)}, RQ's {sorted(w)}"
        for f in ("type", "worker_name", "execution_id"):
            assert g.get(f) == w.get(f), f"{results}.{f}: {g.get(f)!r}, RQ's {w.get(f)!r}"
        for entry in (w, g):
            if "execution_started_at" in entry:
                assert float(entry["execution_started_at"]) <= \
                    float(entry["execution_ended_at"]), entry
        if "return_value" in w:
            want_value, got_value = dict(w["return_value"]), dict(g["return_value"])
            for measured in ("queue_wait_s", "run_s"):   # DELIBERATE["result.*"]
                assert got_value.pop(measured) >= 0 and want_value.pop(measured) == 0
            assert got_value == want_value, f"{results}: {got_value}, RQ's {want_value}"
        if "exc_string" in w:                            # DELIBERATE["result.exc_string"]
            assert g["exc_string"] and w["exc_string"]


def assert_worker_conforms(ref: Snapshot, ours: Snapshot) -> None:
    want = ref.key("rq:worker:<worker>")["fields"]
    got = ours.key("rq:worker:<worker>")["fields"]
    assert set(got) == set(want), f"worker hash: {sorted(got)}, RQ's {sorted(want)}"
    for f in WORKER_STATS:
        assert got.get(f) == want.get(f), f"worker.{f}: {got.get(f)!r}, RQ's {want.get(f)!r}"
    assert ("total_working_time" in got) == ("total_working_time" in want)
    assert want["state"] == "idle" and got["state"] in ("idle", "busy")   # DELIBERATE
    assert got["queues"] == want["queues"] and got["death"] and want["death"]
    for fields in (want, got):          # DELIBERATE["worker.total_working_time"]
        assert float(fields.get("total_working_time", 0)) >= 0


def test_successful_jobs_leave_rqs_layout(r: redis.Redis, redis_url: str,
                                          models_dir: Path) -> None:
    """Two jobs that succeed: finished status, result stream, finished registry scored to
    expire with the result, executions and started registry cleaned, worker counters."""

    def jobs(r: redis.Redis) -> list[str]:
        return [enqueue(r, GenerationSpec(model="tiny", steps=2, seed=s, num_images=1 + s,
                                          sampler="ddim")).id for s in range(2)]

    ref, ours = run_both(r, redis_url, models_dir, jobs, rq_reference.generate)
    assert_conforms(ref, ours, 2)
    assert ref.key("rq:job:<job0>")["fields"]["status"] == "finished"
    # The registry's score is when the result expires (the job hash's TTL says the same).
    finished = ref.key("rq:finished:ddpm.tiny.normal")["members"]
    assert all(abs(score - RESULT_TTL) <= TOL for score in finished.values()), finished


def test_an_invalid_spec_fails_without_retry_as_rq_records_it(
        r: redis.Redis, redis_url: str, models_dir: Path) -> None:
    """A job whose payload is not a valid spec fails at once, retries left unused: failed
    status, failed registry scored to expire with the failure TTL, a failure result."""

    def jobs(r: redis.Redis) -> list[str]:
        bad = GenerationSpec.model_construct(**{**GenerationSpec(model="tiny", seed=1)
                                                .model_dump(), "steps": 0})
        return [enqueue(r, bad).id]

    ref, ours = run_both(r, redis_url, models_dir, jobs, rq_reference.generate)
    assert_conforms(ref, ours, 1)
    assert ref.key("rq:job:<job0>")["fields"]["status"] == "failed"
    failed = ref.key("rq:failed:ddpm.tiny.normal")["members"]      # expires with the failure
    assert abs(failed["<job0>"] - RESULT_TTL) <= TOL, failed


def test_a_job_retried_then_failed_leaves_rqs_layout(r: redis.Redis, redis_url: str,
                                                     models_dir: Path) -> None:
    """A job whose every run fails with retries allowed: re-queued by RQ's Retry once, then
    failed, retries used up; one failure result, two failures counted. Ours fails it where
    its writes cannot be stored (its event stream's key holds a string: WRONGTYPE), as for
    any storage failure, with a retry."""

    def jobs(r: redis.Redis) -> list[str]:
        job = enqueue(r, GenerationSpec(model="tiny", steps=2, seed=3), retries=1)
        r.set(events_key(job.id), "not a stream")
        return [job.id]

    ref, ours = run_both(r, redis_url, models_dir, jobs, rq_reference.flaky)
    assert_conforms(ref, ours, 1)
    fields = ref.key("rq:job:<job0>")["fields"]
    assert (fields["status"], fields["retries_left"]) == ("failed", "0")
    assert ref.key("rq:worker:<worker>")["fields"]["failed_job_count"] == "2"
