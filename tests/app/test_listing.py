"""What users expect of a jobs API, over real HTTP and a real Redis: `GET /v1/generations`
lists the caller's own jobs newest first, in bounded pages, filtered by status, from a
per-caller index written by the submit script itself (a POST stays one Redis command:
tests/app/test_lean_api.py); `model` may be left out when exactly one model is served; the
WebSocket route, which OpenAPI cannot describe, is documented in the API's description.

No worker: an advertisement makes the API accept the model, and the jobs stay queued.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from test_lean_api import Commands, advertise

KEYS = ("alice-secret-key", "bob-secret-key")
DIGESTS = ",".join(hashlib.sha256(k.encode()).hexdigest() for k in KEYS)
H1, H2 = ({"Authorization": f"Bearer {k}"} for k in KEYS)


def _post(c: httpx.Client, headers: dict[str, str] | None = None, **body: Any) -> str:
    r = c.post("/v1/generations", json={"model": "tiny", "steps": 2, **body}, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _walk(c: httpx.Client, headers: dict[str, str] | None = None,
          **params: Any) -> list[dict[str, Any]]:
    """Every page of the listing, following next_cursor; each page within its limit."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = c.get("/v1/generations", params=query, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["generations"]) <= params.get("limit", 20)
        items += page["generations"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    pytest.fail("the listing never ended")


def test_list_own_jobs_newest_first_paged_and_filtered(start_api: Callable[..., Any],
                                                       r: redis.Redis) -> None:
    api = start_api({"DDPM_API_KEYS": DIGESTS, "DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        mine = [_post(c, H1, seed=i) for i in range(7)]
        theirs = [_post(c, H2) for _ in range(2)]
        assert c.get("/v1/generations").status_code == 401

        listed = c.get("/v1/generations", headers=H1).json()
        assert [g["id"] for g in listed["generations"]] == mine[::-1]
        assert listed["next_cursor"] is None
        # Each item is the job as its own GET reports it (queue positions included).
        for g in listed["generations"]:
            assert g == c.get(f"/v1/generations/{g['id']}", headers=H1).json()
        stamps = [g["created_at"] for g in listed["generations"]]
        assert stamps == sorted(stamps, reverse=True)

        for limit in (1, 2, 3, 7, 100):
            assert [g["id"] for g in _walk(c, H1, limit=limit)] == mine[::-1], limit
        assert [g["id"] for g in _walk(c, H2)] == theirs[::-1]

        # Status filters (one or several).
        for job in (mine[1], mine[4]):
            assert c.delete(f"/v1/generations/{job}", headers=H1).status_code == 200
        canceled = [g["id"] for g in _walk(c, H1, status="canceled", limit=1)]
        assert canceled == [mine[4], mine[1]]
        queued = [g["id"] for g in _walk(c, H1, status="queued", limit=2)]
        assert queued == [j for j in mine[::-1] if j not in canceled]
        both = [g["id"] for g in _walk(c, H1, status=["queued", "canceled"])]
        assert both == mine[::-1]
        assert _walk(c, H1, status="succeeded") == []
        assert _walk(c, H2, status="canceled") == []

        # A job that has expired drops out of the listing (and of the index).
        r.delete(f"rq:job:{mine[6]}")
        assert [g["id"] for g in _walk(c, H1, limit=2)] == mine[5::-1]


def test_a_foreign_job_in_the_callers_index_is_never_listed(start_api: Callable[..., Any],
                                                            r: redis.Redis) -> None:
    """Defence in depth: the index only says where to look; each job's own owner decides.
    Bob's job written straight into Alice's index (newest, between hers, and oldest) is in
    none of her pages, filtered or not, and still in Bob's."""
    api = start_api({"DDPM_API_KEYS": DIGESTS, "DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        mine = [_post(c, H1, seed=i) for i in range(3)]
        theirs = [_post(c, H2, seed=i) for i in range(3)]
        (index,) = (k for k in r.scan_iter("ddpm:jobs:*") if r.zscore(k, mine[0]) is not None)
        assert r.zscore(index, theirs[0]) is None
        scores = [r.zscore(index, j) for j in mine]
        assert all(s is not None for s in scores)
        newest, oldest = max(scores) + 1, min(scores) - 1    # type: ignore[type-var, operator]
        between = (scores[0] + scores[1]) / 2                # type: ignore[operator]
        r.zadd(index, dict(zip(theirs, (newest, between, oldest), strict=True)))

        for params in ({}, {"limit": 1}, {"limit": 2}, {"status": "queued"},
                       {"status": "queued", "limit": 1}):
            assert [g["id"] for g in _walk(c, H1, **params)] == mine[::-1], params
        for job in theirs:      # and never by its id either
            assert c.get(f"/v1/generations/{job}", headers=H1).status_code == 404
        assert [g["id"] for g in _walk(c, H2)] == theirs[::-1]


def test_the_listing_index_is_bounded_and_expires(start_api: Callable[..., Any],
                                                  r: redis.Redis) -> None:
    api = start_api({"DDPM_MAX_LISTED_JOBS": "3", "DDPM_RESULT_TTL": "600",
                     "DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ids = [_post(c) for _ in range(5)]
        assert [g["id"] for g in _walk(c)] == ids[:1:-1]     # the newest 3
        (index,) = r.scan_iter("ddpm:jobs:*")
        assert r.zcard(index) == 3
        assert 0 < r.ttl(index) <= 600
        # An entry older than DDPM_RESULT_TTL is trimmed at the next submission.
        r.zadd(index, {"ancient": 1})
        _post(c)
        assert r.zscore(index, "ancient") is None and r.zcard(index) == 3


def test_a_post_still_is_one_redis_command(start_api: Callable[..., Any],
                                           r: redis.Redis) -> None:
    api = start_api()
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        _post(c)
        with Commands(r) as seen:
            ids = [_post(c, seed=i) for i in range(5)]
        assert seen.seen == ["EVALSHA"] * 5, seen.seen
        assert [g["id"] for g in _walk(c)][:5] == ids[::-1]


@pytest.mark.parametrize("params, field", [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
    ({"status": "done"}, "status"), ({"status": ["queued"] * 6}, "status"),
    ({"cursor": "nonsense"}, "cursor"), ({"cursor": "1." + "a" * 65}, "cursor"),
    ({"cursor": "x" * 200}, "cursor"), ({"cursor": "99999999999999999999.abc"}, "cursor"),
])
def test_bad_list_parameters_are_422_naming_them(client: httpx.Client,
                                                 params: dict[str, Any], field: str) -> None:
    resp = client.get("/v1/generations", params=params)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"].split(".")[0] == field, resp.text   # status.0


def test_a_cursor_of_an_expired_or_foreign_job_still_pages_on(
        start_api: Callable[..., Any], r: redis.Redis) -> None:
    api = start_api({"DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        ids = [_post(c) for _ in range(4)]
        page = c.get("/v1/generations", params={"limit": 2}).json()
        assert [g["id"] for g in page["generations"]] == ids[:1:-1]
        r.delete(f"rq:job:{ids[2]}")      # the cursor's job expires between pages
        rest = c.get("/v1/generations", params={"cursor": page["next_cursor"]}).json()
        assert [g["id"] for g in rest["generations"]] == ids[1::-1]


def test_model_may_be_left_out_when_one_model_is_served(start_api: Callable[..., Any],
                                                        r: redis.Redis) -> None:
    api = start_api({"DDPM_MODELS_CACHE_S": "0"})
    with httpx.Client(base_url=api.url, timeout=30) as c:
        none = c.post("/v1/generations", json={"steps": 2})
        assert none.status_code == 422, none.text
        assert none.json()["error"]["field"] == "model"
        assert "no model is served" in none.json()["error"]["message"]

        advertise(r, "tiny")
        one = c.post("/v1/generations", json={"steps": 2})
        assert one.status_code == 202, one.text
        assert one.json()["model"] == "tiny" and one.json()["request"]["model"] == "tiny"
        assert c.post("/v1/generations", json={"model": None, "steps": 2}).status_code == 202

        advertise(r, "tiny", "other", name="second")
        two = c.post("/v1/generations", json={"steps": 2})
        assert two.status_code == 422, two.text
        err = two.json()["error"]
        assert err["field"] == "model" and "other, tiny" in err["message"], err
        assert c.post("/v1/generations", json={"model": "other"}).status_code == 202


def test_the_websocket_route_is_documented(client: httpx.Client) -> None:
    """FastAPI leaves WebSocket routes out of OpenAPI: the API's description says it all."""
    doc = client.get("/openapi.json").json()
    text = doc["info"]["description"]
    for needed in ("/v1/generations/{id}/ws", "last_event_id", "images=inline",
                   '{"id", "event", "data"}', "4404", "4429", "4503", "1000", "1013"):
        assert needed in text, needed
    assert "GET" in doc["paths"]["/v1/generations"].__repr__().upper()
    links = doc["components"]["schemas"]["Links"]["properties"]["websocket"]
    assert "WebSocket" in links.get("description", ""), links
