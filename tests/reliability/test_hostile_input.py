"""Hostile input: whatever arrives, over HTTP or straight into an RQ queue, is refused with
a clear error for that one request or job, and nothing else is disturbed.

Already covered elsewhere, and not repeated here: schemathesis fuzzing of every operation
in the OpenAPI schema, on unknown and on real jobs (tests/app/test_fuzz.py); a 422 naming
the field for each documented bound, bad JSON, a 413 for declared and for chunked bodies
over the limit (tests/app/test_api.py: test_bad_input_is_422_naming_the_field,
test_malformed_and_oversized_bodies); the first malformed RQ payloads (too many images, a
foreign function, a label on an unconditional model, an unserved model:
tests/worker/test_worker_redis.py::test_bad_payloads_fail_their_job_not_the_worker).

Here: hypothesis properties of the request model itself (accepted ⇒ every bound holds and
the spec survives the RQ payload round trip; refused ⇒ a ValidationError naming a field,
never another exception), the same property over real HTTP against a real API and worker,
a catalogue of hostile bodies (deep nesting, huge numbers, NaN, surrogates, NUL, duplicate
keys, invalid UTF-8, wrong content types), and job hashes RQ itself cannot read.
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.configuration
import pytest
import redis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from pydantic import ValidationError
from rq import Queue
from rq.serializers import JSONSerializer
from websockets.sync.client import connect

from app.body_limit import BODY_TYPES, UPLOAD_PATHS
from app.errors import _field
from app.main import create_app
from app.schemas import GenerationRequest
from app.settings import ApiSettings
from contract.events import EventType
from contract.keys import JOB_FUNC, SERIALIZER, events_key, queue_name
from contract.limits import (
    MAX_CLASS_LABEL,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PREVIEW_SIDE,
    MAX_SEED,
    MAX_SNAPSHOT_EVERY,
    MAX_STEPS,
    MIN_SNAPSHOT_SIZE,
    MODEL_NAME_PATTERN,
    SNAPSHOT_FORMATS,
)
from contract.queueing import enqueue
from contract.spec import GenerationSpec

FIELDS = set(GenerationRequest.model_fields)
MAX_BODY = 256 * 1024


def _settings(examples: int, *, shrink: bool = True) -> hypothesis.settings:
    """Reproducible, no example database; shrinking only where a case costs no HTTP."""
    phases = [Phase.explicit, Phase.generate, *([Phase.shrink] if shrink else [])]
    return hypothesis.settings(max_examples=examples, derandomize=True, database=None,
                               deadline=None, phases=phases, print_blob=False,
                               suppress_health_check=list(HealthCheck))


# -- strategies ---------------------------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.one_of(SURROGATES, st.sampled_from("\x00\n\r\u202e\ufeff/.%\\")), max_size=8),
    st.sampled_from(["tiny", "tinycond", "../tiny", "/etc/passwd", "tiny/../../x", "..",
                     "%2e%2e", "t\u0456ny", "\uff54\uff49\uff4e\uff59", "tiny\n", "tiny\x00",
                     "ddim", "ddpm", "dpm++2m", "x0", "xt", "high", "low", "1e400", "NaN",
                     "-1", "9" * 40, "http://127.0.0.1/x", "https://example.com/h"]),
    st.text(min_size=2000, max_size=2000, alphabet="a"),
)
HOSTILE_NUMBER = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**63 - 1, 2**63, 2**64, 2**70, -(2**63), -1, 0, 10**30]),
    st.floats(),                                   # NaN, ±inf, -0.0, subnormals included
    st.floats(min_value=-2.0, max_value=25.0),
)
SCALAR = st.one_of(st.none(), st.booleans(), HOSTILE_NUMBER, HOSTILE_TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def _near(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers inside a bound and just past either end of it."""
    return st.integers(min_value=lo - 2, max_value=hi + 2)


# Per field: values around its bounds (so that many bodies are accepted), or anything.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.sampled_from(["tiny", "tinycond"]), HOSTILE_TEXT),
    "num_images": _near(1, MAX_IMAGES),
    "sampler": st.sampled_from(["ddpm", "ddim", "dpm++2m", "DDIM", "ddim "]),
    "steps": _near(1, MAX_STEPS),
    "eta": st.floats(min_value=-0.5, max_value=1.5),
    "seed": st.one_of(_near(0, 10), st.integers(MAX_SEED - 2, MAX_SEED + 2)),
    "snapshot_every": _near(0, MAX_SNAPSHOT_EVERY),
    "snapshot_kind": st.sampled_from(["x0", "xt", "eps"]),
    "snapshot_size": _near(MIN_SNAPSHOT_SIZE, MAX_PREVIEW_SIDE),
    "snapshot_format": st.sampled_from([*SNAPSHOT_FORMATS, "gif", "PNG", "jpg"]),
    "snapshot_quality": _near(1, 100),
    "class_label": st.one_of(st.none(), _near(0, 12), st.just(MAX_CLASS_LABEL + 1)),
    "guidance_scale": st.floats(min_value=-1.0, max_value=MAX_GUIDANCE + 1),
    "priority": st.sampled_from(["high", "normal", "low", "urgent"]),
    "webhook": st.one_of(st.none(), st.sampled_from(["http://127.0.0.1:9/h", "ftp://x/y",
                                                     "javascript:alert(1)"])),
}


def _consistent(body: dict[str, Any]) -> dict[str, Any]:
    """η only with DDIM, guidance only with a label: what a valid request looks like."""
    if body.get("sampler") != "ddim":
        body.pop("eta", None)
    if body.get("class_label") is None:
        body.pop("guidance_scale", None)
    if body.get("snapshot_format") == "png":
        body.pop("snapshot_quality", None)
    return body


VALID = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "tinycond"])}, optional={
    "num_images": st.integers(1, MAX_IMAGES), "steps": st.integers(1, MAX_STEPS),
    "sampler": st.sampled_from(["ddpm", "ddim", "dpm++2m"]), "eta": st.floats(0, 1),
    "seed": st.integers(0, MAX_SEED), "snapshot_every": st.integers(0, MAX_SNAPSHOT_EVERY),
    "snapshot_kind": st.sampled_from(["x0", "xt"]),
    "snapshot_size": st.integers(MIN_SNAPSHOT_SIZE, 16),
    "snapshot_format": st.sampled_from(SNAPSHOT_FORMATS), "snapshot_quality": st.integers(1, 100),
    "class_label": st.integers(0, MAX_CLASS_LABEL),
    "guidance_scale": st.floats(0, MAX_GUIDANCE),
    "priority": st.sampled_from(["high", "normal", "low"])}).map(_consistent)
# A valid body with one field (or an extra one) set to something near its bounds or hostile.
NEAR_VALID = st.tuples(VALID, st.sampled_from([*sorted(FIELDS), "extra"]).flatmap(
    lambda f: st.tuples(st.just(f), st.one_of(FIELD_VALUES.get(f, VALUE), VALUE)))).map(
    lambda t: {**t[0], t[1][0]: t[1][1]})
ANY_BODY = st.one_of(
    VALID, NEAR_VALID, NEAR_VALID,
    st.dictionaries(st.one_of(st.sampled_from(sorted(FIELDS)), HOSTILE_TEXT), VALUE,
                    max_size=6),
    VALUE)


# -- the request model, in-process -------------------------------------------------------


def _check_accepted(req: GenerationRequest) -> None:
    """Every documented bound holds, and the spec survives what RQ does to it."""
    s = req.spec()
    assert re.fullmatch(MODEL_NAME_PATTERN, s.model), s.model
    assert 1 <= s.num_images <= MAX_IMAGES and 1 <= s.steps <= MAX_STEPS
    assert 0 <= s.seed <= MAX_SEED and 0 <= s.snapshot_every <= MAX_SNAPSHOT_EVERY
    assert math.isfinite(s.eta) and 0 <= s.eta <= 1
    assert s.eta == 0 or s.sampler == "ddim"
    assert math.isfinite(s.guidance_scale) and 0 <= s.guidance_scale <= MAX_GUIDANCE
    assert s.guidance_scale == 1.0 or s.class_label is not None
    assert s.class_label is None or 0 <= s.class_label <= MAX_CLASS_LABEL
    assert req.webhook is None or re.match(r"^https?://", req.webhook)
    assert s.snapshot_size is None or MIN_SNAPSHOT_SIZE <= s.snapshot_size <= MAX_PREVIEW_SIDE
    assert s.snapshot_format in (None, *SNAPSHOT_FORMATS)
    assert s.snapshot_quality is None or (1 <= s.snapshot_quality <= 100
                                          and s.snapshot_format != "png")
    for v in (s.num_images, s.steps, s.seed, s.snapshot_every):
        assert type(v) is int
    # The worker reads the kwargs back from RQ's JSON payload: strict JSON, no NaN.
    payload = JSONSerializer.dumps((JOB_FUNC, None, (), s.model_dump(mode="json")))
    json.loads(payload, parse_constant=lambda c: pytest.fail(f"{c} in the payload"))
    _, _, _, kwargs = JSONSerializer.loads(payload)
    assert GenerationSpec.model_validate(kwargs) == s


def _check_refused(e: ValidationError, body: object) -> None:
    """Each error names a field the body has or the model declares, as the API reports it;
    only a body that is no object, or a key no UTF-8 can hold (a lone surrogate), has none."""
    assert e.errors(), body
    for err in e.errors():
        loc = err["loc"]
        if not isinstance(body, dict):
            assert loc == () and err["type"] == "model_type", err
            continue
        if loc == () and err["type"] == "string_unicode":
            assert any(isinstance(k, str) and re.search("[\ud800-\udfff]", k) for k in body)
            continue
        assert loc and (loc[0] in FIELDS or loc[0] in body), err
        assert _field(("body", *loc)) is not None, err
        assert err["msg"], err


def test_request_validation_accepts_only_bounded_specs(record: Callable[..., None]) -> None:
    """Any JSON-ish value: a spec within every bound that round-trips through the RQ
    payload, or a ValidationError whose errors name fields; never any other exception."""
    seen = {"accepted": 0, "refused": 0}

    @_settings(500)
    @given(body=ANY_BODY)
    def prop(body: Any) -> None:
        try:
            req = GenerationRequest.model_validate(body)
        except ValidationError as e:
            seen["refused"] += 1
            _check_refused(e, body)
            return
        seen["accepted"] += 1
        _check_accepted(req)

    prop()
    # The strategy reaches both sides often, or the property says little.
    assert seen["accepted"] >= 100 and seen["refused"] >= 100, seen
    record(hypothesis_examples=sum(seen.values()), **seen)


# -- over HTTP ----------------------------------------------------------------------------


class Http:
    """An httpx client that counts what it sent and every 5xx it got."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)
        self.sent = 0
        self.server_errors: list[str] = []

    def __call__(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self.client.request(method, path, **kw)
        self.sent += 1
        if r.status_code >= 500:
            self.server_errors.append(f"{method} {path} → {r.status_code}: {r.text[:300]}")
        return r

    def close(self) -> None:
        self.client.close()


def _error(r: httpx.Response, status: int | set[int], what: object = "") -> dict[str, Any]:
    """The shared error shape, as JSON, with the expected status."""
    statuses = {status} if isinstance(status, int) else status
    assert r.status_code in statuses, (what, r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/json", (what, r.headers)
    err = r.json()["error"]
    assert set(err) <= {"code", "message", "field"}, err
    assert isinstance(err["code"], str) and isinstance(err["message"], str), err
    assert err["code"] and err["message"], err
    return err


@pytest.fixture
def served(spawn_worker: Callable[..., Any], start_api: Callable[..., Any],
           wait_for: Callable[..., object]) -> Iterator[tuple[Any, Any, Http]]:
    """A worker (`tiny`, `tinycond`) and an API without a rate limit, so accepted bodies run,
    and with room for 256 KiB bodies, so that deep nesting reaches the JSON parser."""
    worker = spawn_worker()
    api = start_api(env={"DDPM_RATE_LIMIT": "0", "DDPM_MAX_BODY_BYTES": str(MAX_BODY),
                         "DDPM_MAX_UPLOAD_BYTES": str(MAX_BODY)})
    http = Http(api.url)
    wait_for(lambda: http.client.get("/readyz").status_code == 200, 120, "a worker",
             worker=worker)
    yield api, worker, http
    http.close()


def _wait_status(http: Http, job_id: str, statuses: set[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = http("GET", f"/v1/generations/{job_id}").json()["status"]
        if status in statuses or time.monotonic() > deadline:
            return str(status)
        time.sleep(0.05)


def test_any_json_body_gets_202_or_a_clear_4xx(
        served: tuple[Any, Any, Http], record: Callable[..., None]) -> None:
    """The property again, over real HTTP: a body the model refuses is a 422 naming the same
    field; an accepted one is a 202 whose job holds exactly the validated spec (or a 404 /
    422 / 429 the API explains). Accepted jobs are canceled at once to keep the worker free."""
    api, worker, http = served
    statuses: dict[int, int] = {}

    @_settings(200, shrink=False)
    @given(body=ANY_BODY)
    def prop(body: Any) -> None:
        text = json.dumps(body, allow_nan=True)          # NaN/Infinity tokens, \ud800 escapes
        r = http("POST", "/v1/generations", content=text,
                 headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        try:
            req = GenerationRequest.model_validate(json.loads(text))
        except ValidationError as e:
            err = _error(r, 422, body)
            first = e.errors()[0]["loc"]
            assert err.get("field") == _field(("body", *first)), (body, err)
            return
        if r.status_code != 202:
            _error(r, {404, 422}, body)      # unserved model, steps > T, label, webhook host
            return
        job = r.json()
        assert re.fullmatch(r"[0-9a-f]{32}", job["id"]), job
        sent = req.spec().model_dump(exclude={"seed"})
        assert {k: v for k, v in job["request"].items() if k != "seed"} == sent, job
        if "seed" in body:
            assert job["request"]["seed"] == req.seed
        assert http("DELETE", f"/v1/generations/{job['id']}").status_code in (200, 409)

    prop()
    assert statuses.get(202, 0) >= 20 and statuses.get(422, 0) >= 40, statuses
    assert not http.server_errors, http.server_errors
    assert http("GET", "/healthz").status_code == 200
    assert "Traceback" not in api.log(), api.log()[-3000:]
    assert worker.proc.poll() is None, worker.log()[-3000:]
    record(hypothesis_examples=sum(statuses.values()), http_requests=http.sent,
           statuses={str(k): v for k, v in sorted(statuses.items())},
           http_5xx=len(http.server_errors))


def _deep(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# (name, body bytes, content type, expected status, expected field or None)
HOSTILE_BODIES: list[tuple[str, bytes, str, int, str | None]] = [
    ("100k nested arrays", _deep(100_000), "application/json", 422, None),
    ("10k nested arrays as the model", b'{"model":' + _deep(10_000) + b"}",
     "application/json", 422, None),
    ("20k nested objects", b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "application/json", 422,
     None),
    ("over the body limit", b'{"model":"' + b"a" * MAX_BODY + b'"}', "application/json", 413,
     None),
    ("a 5000-digit integer", b'{"model":"tiny","steps":' + b"9" * 5000 + b"}",
     "application/json", 422, None),
    ("seed 2**70", b'{"model":"tiny","seed":%d}' % 2**70, "application/json", 422, "seed"),
    ("seed 2**63", b'{"model":"tiny","seed":%d}' % 2**63, "application/json", 422, "seed"),
    ("negative seed", b'{"model":"tiny","seed":-1}', "application/json", 422, "seed"),
    ("fractional seed", b'{"model":"tiny","seed":1.5}', "application/json", 422, "seed"),
    ("steps 1e400 (inf)", b'{"model":"tiny","steps":1e400}', "application/json", 422,
     "steps"),
    ("NaN guidance", b'{"model":"tinycond","class_label":1,"guidance_scale":NaN}',
     "application/json", 422, "guidance_scale"),
    ("-Infinity eta", b'{"model":"tiny","sampler":"ddim","eta":-Infinity}',
     "application/json", 422, "eta"),
    ("a lone surrogate as the model", b'{"model":"\\ud800"}', "application/json", 422,
     "model"),
    ("a lone surrogate as a key", b'{"model":"tiny","\\udfff":1}', "application/json", 422,
     None),
    ("NUL in the model", b'{"model":"ti\\u0000ny"}', "application/json", 422, "model"),
    ("RTL override in a key", '{"model":"tiny","x\u202ey":1}'.encode(), "application/json",
     422, "x\u202ey"),
    ("a 15000-char model", b'{"model":"' + b"a" * 15000 + b'"}', "application/json", 422,
     "model"),
    ("a 15000-char key", b'{"model":"tiny","' + b"k" * 15000 + b'":1}', "application/json",
     422, "k" * 15000),
    ("invalid UTF-8", b'{"model":"\xff\xfe"}', "application/json", 422, None),
    ("truncated UTF-8", b'{"model":"tiny\xe2\x82"}', "application/json", 422, None),
    ("null", b"null", "application/json", 422, None),
    ("a list", b'[{"model":"tiny"}]', "application/json", 422, None),
    ("a string", b'"tiny"', "application/json", 422, None),
    ("empty", b"", "application/json", 422, None),
    ("whitespace", b" \n\t ", "application/json", 422, None),
    ("trailing garbage", b'{"model":"tiny"} x', "application/json", 422, None),
    ("text/plain", b'{"model":"tiny"}', "text/plain", 415, None),
    ("form-encoded", b"model=tiny&steps=1", "application/x-www-form-urlencoded", 415, None),
    # A form's fields go in its `request` part (JSON); its files are the input images.
    ("multipart", b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n--x--',
     "multipart/form-data; boundary=x", 422, "model"),
    ("XML", b"<model>tiny</model>", "application/xml", 415, None),
    ("sampler in another case", b'{"model":"tiny","sampler":"DDIM"}', "application/json",
     422, "sampler"),
    ("a nested object as steps", b'{"model":"tiny","steps":{"$gt":1}}', "application/json",
     422, "steps"),
    ("the largest valid request", b'{"model":"tiny","steps":1000,"num_images":64,'
     b'"snapshot_every":1000}', "application/json", 202, None),
]


def test_each_post_takes_the_media_types_its_schema_states() -> None:
    """Which media types a POST's body may have is one list (app.body_limit.BODY_TYPES:
    another is a 415, or OpenAI's 400); the OpenAPI document states the same, route by
    route, and the routes that take files are the ones that get the upload limit."""
    doc = create_app(ApiSettings()).openapi()
    stated = {path: set(op["requestBody"]["content"]) for path, ops in doc["paths"].items()
              for op in ops.values() if "requestBody" in op}
    assert stated == {path: set(types) for path, types in BODY_TYPES.items()}
    assert {p for p, types in stated.items() if "multipart/form-data" in types} == UPLOAD_PATHS


def test_hostile_bodies_get_a_clear_4xx_and_the_api_stays_up(
        served: tuple[Any, Any, Http], record: Callable[..., None]) -> None:
    """Each hostile body: its status, the shared JSON error shape and (where one is at fault)
    the field; edge values that are valid really run; /healthz answers after all of it."""
    api, worker, http = served
    for name, body, ctype, status, field in HOSTILE_BODIES:
        r = http("POST", "/v1/generations", content=body, headers={"content-type": ctype})
        if status == 202:
            assert r.status_code == 202, (name, r.text)
            assert http("DELETE", f"/v1/generations/{r.json()['id']}").status_code == 200
            continue
        err = _error(r, status, name)
        assert err.get("field") == field, (name, err)

    # Duplicate keys: the last one wins, for validation and for the job alike.
    r = http("POST", "/v1/generations", content=b'{"model":"nope","steps":9999,"model":"tiny",'
             b'"steps":2,"seed":5,"seed":0}', headers={"content-type": "application/json"})
    assert r.status_code == 202, r.text
    assert (r.json()["request"]["steps"], r.json()["request"]["seed"]) == (2, 0)
    edge = [r.json()["id"]]
    # Valid edge values run to the end: the largest seed, the least steps, a JSON float
    # that is an integer, snapshots every step.
    for body in ({"model": "tiny", "seed": MAX_SEED, "steps": 1},
                 {"model": "tinycond", "class_label": 9, "guidance_scale": 20.0, "steps": 2,
                  "seed": 1e18, "snapshot_every": 1, "snapshot_kind": "xt"}):
        r = http("POST", "/v1/generations", json=body)
        assert r.status_code == 202, (body, r.text)
        edge.append(r.json()["id"])
    for job_id in edge:
        assert _wait_status(http, job_id, {"succeeded", "failed"}) == "succeeded", job_id

    # Hostile headers, paths and stream resume points.
    too_long = http("POST", "/v1/generations", json={"model": "tiny"},
                    headers={"Idempotency-Key": "k" * 256})
    assert _error(too_long, 422)["field"] == "Idempotency-Key"
    control = http("POST", "/v1/generations", json={"model": "tiny"},
                   headers={"Idempotency-Key": "a\tb"})
    assert _error(control, 422)["field"] == "Idempotency-Key"
    job = edge[0]
    for last in ("x" * 64, "1-2-3", "-1", "18446744073709551616-0"):
        r = http("GET", f"/v1/generations/{job}/events", headers={"Last-Event-ID": last})
        assert _error(r, 422, last)["field"] == "Last-Event-ID"
    for path in (f"/v1/generations/{'a' * 5000}", "/v1/generations/%00", "/v1/generations/%ff",
                 "/v1/generations/..%2f..%2fmetrics", f"/v1/generations/{job}%00",
                 f"/v1/generations/{job}/images/99999999999999999999999",
                 f"/v1/generations/{job}/images/-1", f"/v1/generations/{job}/images/1e3",
                 "/v1/models/%2e%2e", "/v1/models/..%2f..%2fetc%2fpasswd",
                 "/v1/models/\u0442iny"):
        _error(http("GET", path), {404, 422}, path)
    ws_base = api.url.replace("http://", "ws://") + f"/v1/generations/{job}/ws"
    for query in ("?last_event_id=%00", f"?last_event_id={'9' * 40}"):
        with connect(ws_base + query, open_timeout=10) as ws, \
                pytest.raises(Exception) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 4422, query        # type: ignore[attr-defined]

    assert not http.server_errors, http.server_errors
    assert http("GET", "/healthz").status_code == 200
    counted = [line for line in http("GET", "/metrics").text.splitlines()
               if re.search(r'status="5\d\d"', line) and "/readyz" not in line]
    assert not counted, counted                  # (/readyz says 503 until the worker is up)
    assert "Traceback" not in api.log(), api.log()[-3000:]
    assert worker.proc.poll() is None, worker.log()[-3000:]
    record(hostile_bodies=len(HOSTILE_BODIES), http_requests=http.sent,
           http_5xx=len(http.server_errors), edge_jobs_succeeded=len(edge))


# -- straight into the RQ queue -----------------------------------------------------------


def _payload(func: object, args: object = (), kwargs: object = None,
             instance: object = None) -> bytes:
    return zlib.compress(json.dumps([func, instance, args, kwargs or {}]).encode())


def test_job_hashes_rq_cannot_read_fail_only_their_job(
        r: redis.Redis, spawn_worker: Callable[..., Any], wait_for: Callable[..., object],
        tmp_path: Path, record: Callable[..., None]) -> None:
    """Jobs written behind the API's back, most of which RQ itself cannot decode (garbage,
    non-JSON, wrong shapes, unreadable hash fields) or which are not ours: each ends FAILED
    with a message and one error event, a foreign function never runs, and the same worker
    then runs a good job. Before the fix an undecodable payload or a bad hash field killed
    the worker (RQ raised out of its dequeue)."""
    worker = spawn_worker()
    wait_for(lambda: r.keys("ddpm:workers:*"), 60, "the worker to advertise", worker=worker)
    q = Queue(queue_name("tiny"), connection=r, serializer=SERIALIZER)
    marker = tmp_path / "foreign-function-ran"
    good_kwargs = {"model": "tiny", "steps": 2}
    cases: dict[str, tuple[dict[str, bytes] | None, str]] = {
        # name: (fields written over a good job's hash, words its failure must contain)
        "garbage data": ({"data": b"\x00\xff\xfegarbage"}, "cannot be decoded"),
        "zlib of non-JSON": ({"data": zlib.compress(b"\x80 not json")}, "cannot be decoded"),
        "a JSON object": ({"data": zlib.compress(b'{"a": 1}')}, "cannot be decoded"),
        "a short list": ({"data": zlib.compress(b"[1, 2]")}, "cannot be decoded"),
        "truncated zlib": ({"data": _payload(JOB_FUNC)[:-4]}, "cannot be decoded"),
        "deep nesting": ({"data": zlib.compress(_deep(100_000))}, "cannot be decoded"),
        "no kwargs": ({"data": _payload(JOB_FUNC)}, "model"),
        "args, not kwargs": ({"data": _payload(JOB_FUNC, args=[good_kwargs])},
                             "not a generation job"),
        "kwargs a string": ({"data": _payload(JOB_FUNC, kwargs="model=tiny")},
                            "invalid generation spec"),
        "a foreign function": ({"data": _payload("builtins.open", args=[str(marker), "w"])},
                               "not a generation job"),
        "huge values": ({"data": _payload(JOB_FUNC, kwargs={
            "model": "tiny", "num_images": 10**30, "steps": 2**70, "seed": -(2**90)})},
            "num_images"),
        "a 1 MB model name": ({"data": _payload(JOB_FUNC, kwargs={"model": "t" * 1_000_000})},
                              "model"),
        "created_at garbage": ({"created_at": b"yesterday"}, "cannot be read"),
        "status garbage": ({"status": b"exploded"}, "cannot be read"),
        "timeout garbage": ({"timeout": b"forever"}, "cannot be read"),
        "retries garbage": ({"retries_left": b"many"}, "cannot be read"),
        "dependencies garbage": ({"dependency_ids": b"[{"}, "cannot be read"),
        "meta garbage": ({"meta": b"\xff\x00"}, "storing results failed"),
    }
    jobs: dict[str, str] = {}
    for name, (fields, _) in cases.items():
        # Written whole, then queued: the live worker must never see the job half-made.
        job = q.create_job(JOB_FUNC, kwargs=good_kwargs)
        job.save()
        r.hset(job.key, mapping=fields or {})
        q.push_job_id(job.id)
        jobs[name] = job.id
    r.rpush(q.key, "../../not-a-job:id", "no-such-job")       # ids with no job behind them
    good = enqueue(r, GenerationSpec(model="tiny", steps=2))

    def status(job_id: str) -> bytes | None:
        return r.hget(f"rq:job:{job_id}", "status")  # type: ignore[return-value]

    wait_for(lambda: status(good.id) == b"finished", 120, "the good job", worker=worker)
    wait_for(lambda: all(status(j) == b"failed" for j in jobs.values()), 60,
             "every bad job to fail", worker=worker)
    failed = set(q.failed_job_registry.get_job_ids())
    for name, job_id in jobs.items():
        words = cases[name][1]
        assert job_id in failed, name
        errors = [f for _, f in r.xrange(events_key(job_id))
                  if f[b"type"] == str(EventType.ERROR).encode()]
        assert len(errors) == 1, (name, errors)
        assert words in json.loads(errors[0][b"data"])["message"], (name, errors)
    assert not marker.exists(), "the worker ran a foreign function"
    assert q.count == 0, q.job_ids
    assert worker.proc.poll() is None, worker.log()[-3000:]
    # Still serving, with the same process: another good job after all of that.
    again = enqueue(r, GenerationSpec(model="tiny", steps=1))
    wait_for(lambda: status(again.id) == b"finished", 60, "a second good job", worker=worker)
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
    record(injected_bad_jobs=len(jobs), bad_ids=2, failed_cleanly=len(jobs),
           good_jobs_after=2, worker_restarts=0)
