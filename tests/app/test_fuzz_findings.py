"""What a schemathesis run with a fresh seed found (issue 18, item 11), pinned down over
real HTTP against a worker and an API: a malformed webhook URL was a 500, and the served
OpenAPI document said less than the API enforces (a required key on an open API,
`Last-Event-ID` as any string, `guidance_scale` and `eta` as free of other fields). Each
check asks both the document (jsonschema on the served schema) and the API, and needs the
same answer from both. Issue 30's (schemathesis ST201, ST202, ST205): JSON booleans read as
integers, 405s whose `Allow` named one method, and rules the schema did not state."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import ValidationError

from app.auth import new_key
from app.settings import ApiSettings

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


# -- issue 30: strict integers (ST201), every method in Allow (ST205), rules in the schema
# (ST202) -------------------------------------------------------------------------------

# Values of another JSON type where the schema says integer: a boolean (JSON's `true` was
# read as 1), a numeric string. (`1.0` is an integer to JSON Schema, and to the API.)
NOT_INTEGERS = [True, False, "1"]


def test_json_values_of_another_type_are_not_integers(api_url: str) -> None:
    """`{"class_label": true}` was a 202 with class 1, `"steps": true` an OpenAI 200: every
    integer field of both fronts refuses them, as the schema does."""
    schema = _request_schema(api_url)
    native = {"class_label": {"class_label": 0}, "steps": {}, "seed": {}, "num_images": {},
              "snapshot_every": {}}
    with httpx.Client(base_url=api_url, timeout=30) as c:
        for field, extra in native.items():
            for value in NOT_INTEGERS:
                body = {"model": "tinycond", "steps": 1, **extra, field: value}
                resp = c.post("/v1/generations", json=body)
                assert resp.status_code == 422, (body, resp.status_code, resp.text)
                assert resp.json()["error"]["field"] == field, (body, resp.text)
                assert not schema.is_valid(body), body
        for field in ("steps", "n", "seed", "partial_images", "output_compression"):
            for value in NOT_INTEGERS:
                body = {"model": "tiny", "steps": 1, field: value}
                resp = c.post("/v1/images/generations", json=body)
                assert resp.status_code == 400, (body, resp.status_code, resp.text)
                assert resp.json()["error"]["param"] == field, (body, resp.text)
        body = {"model": "tinycond", "steps": 1.0, "class_label": 2.0, "seed": 3.0}
        assert schema.is_valid(body)
        resp = c.post("/v1/generations", json=body)
        assert resp.status_code == 202, resp.text
        assert resp.json()["request"]["class_label"] == 2
        c.delete(f"/v1/generations/{resp.json()['id']}")
        # The multipart `request` part is JSON: the same rule.
        resp = c.post("/v1/generations", files={"request": (None, '{"model": "tiny", '
                                                            '"steps": true}')})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "steps", resp.text


def test_openai_form_fields_still_read_numbers_from_text(api_url: str) -> None:
    """Multipart text parts are strings by nature: `steps=1`, `n=2` and `seed=7` are the
    numbers they stand for, while `steps=true` is not one."""
    with httpx.Client(base_url=api_url, timeout=60) as c:
        form = {"model": "tiny", "steps": "1", "n": "2", "seed": "7"}
        resp = c.post("/v1/images/variations", data=form,
                      files={"image": ("a.png", _png(), "image/png")})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"]) == 2
        resp = c.post("/v1/images/variations", data={**form, "steps": "true"},
                      files={"image": ("a.png", _png(), "image/png")})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "steps", resp.text


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 80, 20)).save(buf, format="PNG")
    return buf.getvalue()


UNDECLARED = ("PUT", "PATCH", "OPTIONS", "DELETE", "POST", "GET")


def test_every_405_lists_every_method_of_its_path(api_url: str) -> None:
    """`PUT /v1/generations` said `Allow: POST` (GET is served there too), `PUT
    /v1/generations/{id}` said `GET` (and DELETE): each 405 lists exactly the methods the
    document declares for that path (what schemathesis's allow_header_conformance asks)."""
    doc = _doc(api_url)
    with httpx.Client(base_url=api_url, timeout=10) as c:
        for path, item in doc["paths"].items():
            declared = {m.upper() for m in item if m in {"get", "post", "delete", "put",
                                                         "patch"}}
            url = re.sub(r"\{[^}]+\}", "0", path)
            for method in UNDECLARED:
                if method in declared:
                    continue
                resp = c.request(method, url)
                assert resp.status_code == 405, (method, path, resp.status_code, resp.text)
                allow = {m.strip() for m in resp.headers["allow"].split(",")}
                assert allow - {"HEAD"} == declared, (method, path, resp.headers["allow"])
                assert "error" in resp.json(), resp.text


def test_cors_is_off_by_default_and_on_for_the_configured_origins(
        api_url: str, start_api: Callable[..., Any]) -> None:
    """DDPM_CORS_ORIGINS: a page on a listed origin may call the API (preflight and
    response headers); off by default, and no other origin is let in."""
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    resp = httpx.options(f"{api_url}/v1/generations", headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in resp.headers, resp.headers
    assert resp.status_code == 405          # no route serves OPTIONS: nothing is allowed

    cors = start_api(env={"DDPM_CORS_ORIGINS": "https://app.example.com"})
    resp = httpx.options(f"{cors.url}/v1/generations", headers=preflight, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    resp = httpx.get(f"{cors.url}/v1/models", headers={"Origin": "https://app.example.com"},
                     timeout=10)
    assert resp.headers["access-control-allow-origin"] == "https://app.example.com"
    other = httpx.options(f"{cors.url}/v1/generations",
                          headers={**preflight, "Origin": "https://evil.example.net"},
                          timeout=10)
    assert "access-control-allow-origin" not in other.headers, other.headers
    # A plain OPTIONS (no preflight) is still a 405 naming the path's methods.
    plain = httpx.options(f"{cors.url}/v1/generations", timeout=10)
    assert plain.status_code == 405 and plain.headers["allow"] == "GET, POST"
    # What is not an origin would match no browser, silently: refused at start instead.
    for bad in ("app.example.com", "https://app.example.com/", "https://a.example,*"):
        with pytest.raises(ValidationError, match="cors_origins"):
            ApiSettings(cors_origins=bad)


def _form_schema(url: str, path: str) -> jsonschema.Draft202012Validator:
    op = _doc(url)["paths"][path]["post"]
    return jsonschema.Draft202012Validator(
        op["requestBody"]["content"]["multipart/form-data"]["schema"])


def test_an_empty_image_is_refused_by_the_schema_as_by_the_api(api_url: str) -> None:
    """An empty `image` part on edits and variations was a 400 the schema did not state;
    now its `minLength` does, and the API's 400 names the part. The same for the native
    API's images in JSON."""
    with httpx.Client(base_url=api_url, timeout=30) as c:
        for path in ("/v1/images/edits", "/v1/images/variations"):
            schema = _form_schema(api_url, path)
            assert schema.is_valid({"image": "x"}), path
            assert not schema.is_valid({"image": ""}), f"{path}: the schema allows an empty image"
            resp = c.post(path, data={"model": "tiny"}, files={"image": ("a.png", b"")})
            assert resp.status_code == 400, (path, resp.status_code, resp.text)
            assert resp.json()["error"]["param"] == "image", resp.text
            assert "empty" in resp.json()["error"]["message"], resp.text
        request, form = _request_schema(api_url), _form_schema(api_url, "/v1/generations")
        for field in ("init_image", "mask", "interpolate_to"):
            body = {"model": "tiny", "steps": 1, field: ""}
            assert not request.is_valid(body), f"the schema allows an empty {field}"
            assert not form.is_valid({field: ""}), f"the form schema allows an empty {field}"
            resp = c.post("/v1/generations", json=body)
            assert resp.status_code == 422 and resp.json()["error"]["field"] == field
        resp = c.post("/v1/generations", files={"init_image": ("a.png", b""),
                                                "request": (None, '{"model": "tiny"}')})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["field"] == "init_image", resp.text


def test_model_dependent_rules_are_stated_in_the_schema(api_url: str) -> None:
    """class_label 7648 (under the schema's 9999) and prompt "NaN" are refused by a model
    with 10 classes: the bound is the model's, and the schema says so where a client
    reads it (the field's description), pointing at `GET /v1/models`; the refusal names
    the field and the model's bound."""
    doc = _doc(api_url)
    native = doc["components"]["schemas"]["GenerationRequest"]["properties"]
    for field in ("class_label", "steps"):
        text = native[field].get("description", "")
        assert "depend" in text and "/v1/models" in text, (field, text)
    openai = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]["prompt"]
    assert "/v1/models" in openai.get("description", ""), openai
    for path in ("/v1/images/edits",):
        prompt = _form_schema(api_url, path).schema["properties"]["prompt"]
        assert "/v1/models" in prompt.get("description", ""), prompt
    with httpx.Client(base_url=api_url, timeout=30) as c:
        resp = c.post("/v1/generations", json={"model": "tinycond", "class_label": 7648})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["field"] == "class_label"
        assert "< 10" in resp.json()["error"]["message"], resp.text
        resp = c.post("/v1/images/generations", json={"model": "tinycond", "prompt": "NaN"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt", resp.text
