"""Job accounting as the API reports it: statuses in the metrics agree with the API, a
canceled job has an end time, and every route is counted under its own name."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq.command import send_stop_job_command
from rq.serializers import JSONSerializer

SLOW = {"model": "tiny", "steps": 1000, "sampler": "ddpm"}   # ~10 s on a 2-core CPU


def ready(client: httpx.Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            pytest.fail("the API never became ready (no worker advertised)")
        time.sleep(0.1)


def poll(client: httpx.Client, job_id: str, statuses: set[str],
         timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = client.get(f"/v1/generations/{job_id}").json()
        if doc.get("status") in statuses:
            return doc
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} never reached {statuses}: {doc}")
        time.sleep(0.05)


def samples(client: httpx.Client, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = client.get("/metrics").text
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name}


def test_stopped_and_canceled_jobs_are_counted_and_dated_as_the_api_reports_them(
        client: httpx.Client, r, spawn_worker) -> None:
    spawn_worker("--max-batch", "8")
    ready(client)
    stopped, deleted = (client.post("/v1/generations", json={**SLOW, "seed": s}).json()["id"]
                        for s in (1, 2))
    poll(client, stopped, {"running"})
    poll(client, deleted, {"running"})

    send_stop_job_command(r, stopped, serializer=JSONSerializer)     # what RQ's tools send
    doc = poll(client, stopped, {"canceled", "failed", "succeeded"}, timeout=15)
    assert doc["status"] == "canceled" and doc["finished_at"], doc

    gone = client.delete(f"/v1/generations/{deleted}")
    assert gone.status_code == 200 and gone.json()["status"] == "canceled", gone.text
    assert gone.json()["finished_at"], gone.json()
    doc = client.get(f"/v1/generations/{deleted}").json()
    assert doc["finished_at"] and doc["finished_at"] >= doc["started_at"], doc

    jobs = {dict(k)["status"]: v for k, v in samples(client, "ddpm_jobs").items()}
    assert jobs["canceled"] == 2 and jobs["failed"] == 0, jobs


def test_docs_and_schema_requests_are_counted_under_their_routes(client: httpx.Client) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/no/such/path").status_code == 404
    def read() -> dict[str, float]:
        return {dict(k)["route"]: v
                for k, v in samples(client, "ddpm_api_requests_total").items()
                if dict(k)["method"] == "GET"}

    # A request is counted as its ASGI call returns, which can be just after the client has
    # read the whole response (a file response especially): wait for the last one.
    deadline = time.monotonic() + 10
    while read().get("/static") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = read()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert counts.get(path) == 1, counts
    assert counts.get("/static") == 1, counts          # a mount, under its prefix
    assert counts.get("unmatched") == 1, counts        # the 404 alone
