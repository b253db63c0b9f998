"""`bench.ab` reads `bench.service --json` documents as the issue-25 figures: per stack row
its images/s, occupancy, CPU per image and Redis costs, and the worker ratio of the K-image
row to each 1-image row."""

from __future__ import annotations

from bench.ab import rows


def _run(images: int, clients: int, worker: float, **extra: float) -> dict:
    return {"side": "stack", "request_images": images, "clients": clients,
            "images_per_s": 100.0 * images, "engine": {"occupancy": extra.get("occ", 0.5)},
            "redis_round_trips": 5.0, "redis_commands": 50.0,
            "cpu_ms": {"worker": worker, "api": 2.0, "redis": 0.3, "client": 0.5}}


def test_rows_label_each_stack_row_and_divide_the_big_rows_worker_by_each_small_ones() -> None:
    doc = {"runs": [{"side": "sampler", "request_images": 64, "clients": 1,
                     "images_per_s": 600.0, "cpu_ms": {"sampler": 1.5}},
                    _run(64, 2, 1.8, occ=1.0), _run(1, 64, 3.0), _run(1, 128, 2.4),
                    {**_run(1, 64, 9.0), "side": "raw"}]}
    got = rows(doc)
    assert sorted(got) == ["1-image, 128 clients", "1-image, 64 clients", "64-image, 2 clients"]
    assert got["1-image, 64 clients"]["ratio"] == 1.8 / 3.0
    assert got["1-image, 128 clients"]["ratio"] == 1.8 / 2.4
    assert "ratio" not in got["64-image, 2 clients"]
    assert got["64-image, 2 clients"]["occupancy"] == 1.0
    assert got["1-image, 64 clients"]["worker"] == 3.0      # the stack row, not the raw one
