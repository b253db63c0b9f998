"""What a schemathesis run with a fresh seed found (issue 18, item 11), pinned down over
real HTTP against a worker and an API: a malformed webhook URL was a 500, and the served
OpenAPI document said less than the API enforces (a required key on an open API,
`Last-Event-ID` as any string, `guidance_scale` and `eta` as free of other fields). Each
check asks both the document (jsonschema on the served schema) and the API, and needs the
same answer from both."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import pytest

from app.auth import new_key

MALFORMED_WEBHOOKS = [
    "http://\u00eeZd\u00c7[\b\u00c9",           # the fuzz's find: urlsplit's "Invalid IPv6 URL"
    "http://[", "http://[::1", "http://[zz]/", "https://[::1]:80/",
    "http://hooks.example.com:99999/", "http://hooks.example.com:port/",
    "http://", "http:///hook", "https://?x=1", "http://:80/",
    "http://user:secret@hooks.example.com/", "http://hooks.example.com\\@evil.test/",
    "http://hooks.example.com/a b", "http://hooks.example.com/\u00e9",
    "http://hooks.example.com/\x00", "http://hooks.example.com\n/",
    "http://h\u00f6oks.example.com/", "http://-hooks.example.com/",
]
WELL_FORMED_WEBHOOKS = ["https://hooks.example.com/ddpm", "http://hooks.example.com:8080/a?b=c#d",
                        "https://hooks.example.com.", "http://127.0.0.1:9/x"]

EDGE_EVENT_IDS = ["", "0", "0-0", "1-1", "00000000000000000000-0",
                  "18446744073709551615-18446744073709551615", "18446744073709551616-0",
                  "99999999999999999999", "000000000000000000000", "null", "-1", "1-",
                  "1-2-3", "abc", "+1", "1.5"]


@pytest.fixture
def api(spawn_worker: Callable[..., Any], start_api: Callable[..., Any],
        wait_for: Callable[..., object]) -> Any:
    """An open API (no keys) whose webhook allow-list holds the hosts above, and a worker
    serving `tiny` and `tinycond` (a request must reach the webhook check: the model is
    looked up first)."""
    worker = spawn_worker()
    api = start_api(env={"DDPM_WEBHOOK_ALLOW_HOSTS": "hooks.example.com",
                         "DDPM_RATE_LIMIT": "0"})
    wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200, 120,
             "the worker to register", worker=worker)
    return api


@pytest.fixture
def api_url(api: Any) -> str:
    return str(api.url)


def _doc(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/openapi.json", timeout=10).json()


def _request_schema(url: str) -> jsonschema.Draft202012Validator:
    schema = _doc(url)["components"]["schemas"]["GenerationRequest"]
    return jsonschema.Draft202012Validator(schema)


def test_malformed_webhooks_are_422_naming_the_field(api: Any, api_url: str) -> None:
    schema = _request_schema(api_url)
    with httpx.Client(base_url=api_url, timeout=10) as c:
        for url in MALFORMED_WEBHOOKS:
            body = {"model": "tiny", "steps": 1, "webhook": url}
            resp = c.post("/v1/generations", json=body)
            assert resp.status_code == 422, (url, resp.status_code, resp.text)
            error = resp.json()["error"]
            assert error["field"] == "webhook", (url, error)
            assert "URL" in error["message"], (url, error)
            assert not schema.is_valid(body), f"the schema accepts the webhook {url!r}"
        for url in WELL_FORMED_WEBHOOKS:
            assert schema.is_valid({"model": "tiny", "webhook": url}), url
        # A well-formed URL whose host is not allowed: refused by the allow-list (which the
        # schema cannot know), still a 422 naming the field.
        resp = c.post("/v1/generations", json={"model": "tiny", "steps": 1,
                                               "webhook": "http://127.0.0.1:9/x"})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "webhook"
        assert "not allowed" in resp.json()["error"]["message"]
    assert "Traceback" not in api.log(), api.log()[-3000:]


def test_security_is_optional_only_when_the_api_is_open(
        api_url: str, start_api: Callable[..., Any]) -> None:
    """Open: each secured operation also lists `{}` (no authentication), and a request
    without a key is served. With keys: the bearer key alone, and none is a 401."""
    doc = _doc(api_url)
    secured = {f"{m.upper()} {p}": op["security"] for p, item in doc["paths"].items()
               for m, op in item.items() if op.get("security")}
    assert secured, "no operation declares its security"
    for label, security in secured.items():
        assert {} in security, f"{label} demands a key of an open API: {security}"
    assert httpx.get(f"{api_url}/v1/models", timeout=10).status_code == 200

    _, digest = new_key()
    keyed = start_api(env={"DDPM_API_KEYS": digest})
    keyed_doc = _doc(keyed.url)
    for p, item in keyed_doc["paths"].items():
        for m, op in item.items():
            if f"{m.upper()} {p}" in secured:
                assert op.get("security") == [{"HTTPBearer": []}], (m, p, op.get("security"))
    assert httpx.get(f"{keyed.url}/v1/models", timeout=10).status_code == 401


def _finished_job(c: httpx.Client, wait_for: Callable[..., object]) -> str:
    resp = c.post("/v1/generations", json={"model": "tiny", "steps": 1, "seed": 1})
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]
    wait_for(lambda: c.get(f"/v1/generations/{job}").json()["status"] == "succeeded", 60,
             f"job {job} to succeed")
    return str(job)


def test_last_event_id_schema_matches_what_the_api_accepts(
        api_url: str, wait_for: Callable[..., object]) -> None:
    doc = _doc(api_url)
    (param,) = [p for p in doc["paths"]["/v1/generations/{job_id}/events"]["get"]["parameters"]
                if p["in"] == "header" and p["name"].lower() == "last-event-id"]
    schema = jsonschema.Draft202012Validator(param["schema"])
    with httpx.Client(base_url=api_url, timeout=30) as c:
        job = _finished_job(c, wait_for)
        for value in EDGE_EVENT_IDS:
            resp = c.get(f"/v1/generations/{job}/events", headers={"Last-Event-ID": value})
            accepted = resp.status_code == 200
            assert resp.status_code in (200, 422), (value, resp.status_code, resp.text)
            assert schema.is_valid(value) == accepted, (
                f"Last-Event-ID {value!r}: the API answers {resp.status_code}, the schema "
                f"says {'valid' if schema.is_valid(value) else 'invalid'}")
    assert not schema.is_valid("null")


def test_cross_field_rules_are_in_the_schema(api_url: str) -> None:
    """guidance_scale needs a class_label; eta needs ddim; snapshot_quality is not for png
    frames: accepted by the API exactly when the schema says valid (tinycond has 10
    classes, so a label itself is fine)."""
    schema = _request_schema(api_url)
    absent = object()
    bodies = []
    for label, scale in itertools.product([absent, None, 3], [absent, 1, 1.0, 2.5, 0]):
        bodies.append({"class_label": label, "guidance_scale": scale})
    for eta, sampler in itertools.product([absent, 0, 0.0, 0.3], [absent, "ddim", "ddpm"]):
        bodies.append({"eta": eta, "sampler": sampler})
    for fmt, quality in itertools.product([absent, None, "png", "jpeg", "webp"],
                                          [absent, None, 1, 50]):
        bodies.append({"snapshot_format": fmt, "snapshot_quality": quality})
    with httpx.Client(base_url=api_url, timeout=10) as c:
        for extra in bodies:
            body = {"model": "tinycond", "steps": 1,
                    **{k: v for k, v in extra.items() if v is not absent}}
            resp = c.post("/v1/generations", json=body)
            assert resp.status_code in (202, 422), (body, resp.status_code, resp.text)
            accepted = resp.status_code == 202
            assert schema.is_valid(body) == accepted, (
                f"{body}: the API answers {resp.status_code} {resp.text[:200]}, the schema "
                f"says {'valid' if schema.is_valid(body) else 'invalid'}")
            if accepted:
                c.delete(f"/v1/generations/{resp.json()['id']}")
