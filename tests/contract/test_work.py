"""The work signal read from a real Redis (contract/work.py): queued jobs' costs from their
enqueue, what the workers advertise, stale values, jobs without a cost, 10,000 queued."""

from __future__ import annotations

import json
import time

import redis

from contract.keys import THROUGHPUT, cost_key
from contract.queueing import QUEUE_KEY_PREFIX, QUEUES_SET, enqueue, enqueue_commands
from contract.spec import GenerationSpec
from contract.work import ModelWork, read_work, store_rates, worker_model_work
from contract.workers import advertise_worker


def spec(**kw: object) -> GenerationSpec:
    return GenerationSpec.model_validate({"model": "tiny", **kw})


def advertise(r: redis.Redis, name: str, work: dict[str, object], *, ttl: int = 30,
              draining: bool = False) -> None:
    doc = {"name": name, "models": [{"name": m} for m in work], "draining": draining,
           "work": work}
    advertise_worker(r, name, json.dumps(doc), ttl, time.time())


def test_queued_image_steps_are_the_queued_jobs_costs_over_every_priority(
        r: redis.Redis) -> None:
    specs = [spec(num_images=4, steps=50), spec(num_images=1, steps=10, priority="high"),
             spec(num_images=2, steps=20, priority="low"),
             spec(num_images=3, steps=30, mask="sha256:" + "a" * 64,
                  init_image="sha256:" + "b" * 64, jump_length=5, jump_n_sample=3),
             spec(model="tinycond", num_images=2, steps=7)]
    for s in specs:
        enqueue(r, s)
    work = read_work(r, time.time())
    assert set(work) == {"tiny", "tinycond"}
    tiny = [s for s in specs if s.model == "tiny"]
    assert work["tiny"].queued_jobs == 4
    assert work["tiny"].queued_image_steps == sum(s.total_steps for s in tiny)
    assert specs[3].total_steps > 3 * 30          # RePaint's jumps are counted
    assert work["tinycond"] == ModelWork(queued_jobs=1, queued_image_steps=14)
    assert work["tiny"].seconds_of_work == 0.0    # no rate known yet


def test_the_admission_scripts_commands_carry_the_cost(r: redis.Redis) -> None:
    """The API runs enqueue's recorded commands itself: the cost is one of them."""
    s = spec(num_images=5, steps=12)
    job, commands = enqueue_commands(r, s, result_ttl=600)
    sets = [c for c in commands if c[0].upper() == b"SET" and c[1] == cost_key(job.id).encode()]
    assert sets == [[b"SET", cost_key(job.id).encode(), b"60", b"EX", b"600"]]
    with r.pipeline(transaction=True) as p:
        for c in commands:
            p.execute_command(*c)
        p.execute()
    assert read_work(r, time.time())["tiny"].queued_image_steps == 60


def test_only_queued_ids_count_and_a_job_without_a_cost_is_read_from_its_spec(
        r: redis.Redis) -> None:
    kept = enqueue(r, spec(num_images=2, steps=10))
    bare = enqueue(r, spec(num_images=3, steps=10))
    r.delete(cost_key(bare.id))                       # enqueued by another tool, say
    r.set(cost_key("gone-job"), 10_000)               # a job deleted behind our back
    work = read_work(r, time.time())
    assert work["tiny"].queued_image_steps == 20 + 30
    assert r.get(cost_key(bare.id)) == b"30", "the cost is written back"
    assert 0 < r.ttl(cost_key(bare.id)) <= 24 * 3600
    assert read_work(r, time.time(), repair=0)["tiny"].queued_image_steps == 50
    # A drain rewrites what is left: the value counts as it is.
    r.set(cost_key(kept.id), 7)
    assert read_work(r, time.time())["tiny"].queued_image_steps == 37
    # Taken off the queue (running now, or ended): no longer queued work.
    r.lrem(QUEUE_KEY_PREFIX + "ddpm.tiny.normal", 0, kept.id)
    assert read_work(r, time.time())["tiny"] == ModelWork(queued_jobs=1,
                                                          queued_image_steps=30)


def test_running_work_workers_rate_and_load_come_from_live_advertisements(
        r: redis.Redis) -> None:
    advertise(r, "a", {"tiny": worker_model_work(16_000, 900.0, 2.0, True),
                       "tinycond": worker_model_work(0, None, 1.0, True)})
    advertise(r, "b", {"tiny": worker_model_work(500, 1100.0, 3.5, True)})
    advertise(r, "c", {"tiny": worker_model_work(40, 2000.0, 1.0, False)}, draining=True)
    advertise(r, "dead", {"tiny": worker_model_work(99_999, 1.0, 99.0, True)}, ttl=1)
    enqueue(r, spec(num_images=4, steps=100))
    work = read_work(r, time.time() + 2)              # "dead" expired by then
    tiny = work["tiny"]
    assert tiny == ModelWork(queued_jobs=1, queued_image_steps=400,
                             running_image_steps=16_540, workers=3, workers_ready=2,
                             image_steps_per_s=1100.0, model_load_s=3.5)
    assert tiny.remaining_image_steps == 16_940
    assert tiny.as_dict()["seconds_of_work"] == round(16_940 / 1100.0, 3)
    assert work["tinycond"] == ModelWork(workers=1, workers_ready=1, model_load_s=1.0)


def test_a_worker_from_before_the_signal_counts_as_a_worker(r: redis.Redis) -> None:
    doc = {"name": "old", "models": [{"name": "tiny"}], "draining": False}
    advertise_worker(r, "old", json.dumps(doc), 30, time.time())
    assert read_work(r, time.time())["tiny"] == ModelWork(workers=1, workers_ready=1)


def test_a_stored_rate_stands_in_when_no_worker_is_live(r: redis.Redis) -> None:
    store_rates(r, {"tiny": (1234.5, 2.5)}, time.time())
    assert r.ttl(THROUGHPUT) > 0
    enqueue(r, spec(num_images=1, steps=1000))
    tiny = read_work(r, time.time())["tiny"]
    assert (tiny.image_steps_per_s, tiny.model_load_s) == (1234.5, 2.5)
    assert tiny.seconds_of_work == 1000 / 1234.5
    advertise(r, "a", {"tiny": worker_model_work(0, 100.0, 1.0, True)})
    assert read_work(r, time.time())["tiny"].image_steps_per_s == 100.0   # live ones first
    r.delete(THROUGHPUT)
    r.hset(THROUGHPUT, "lonely", json.dumps({"image_steps_per_s": 5.0, "load_s": None}))
    assert read_work(r, time.time())["lonely"] == ModelWork(image_steps_per_s=5.0)


def test_ten_thousand_queued_jobs_are_summed_in_one_read(r: redis.Redis) -> None:
    n = 10_000
    queue = QUEUE_KEY_PREFIX + "ddpm.tiny.normal"
    with r.pipeline(transaction=False) as p:
        p.sadd(QUEUES_SET, queue)
        for i in range(n):
            p.rpush(queue, f"job{i}")
            p.set(cost_key(f"job{i}"), i % 97 + 1)
        p.execute()
    work = read_work(r, time.time())["tiny"]
    assert work.queued_jobs == n
    assert work.queued_image_steps == sum(i % 97 + 1 for i in range(n))
