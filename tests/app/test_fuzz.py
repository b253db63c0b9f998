"""Property-based fuzzing of the live API with schemathesis: every operation in the served
OpenAPI schema, against a real worker and Redis, must never answer 5xx and never answer
anything its own schema does not document (status code, content type, body, headers).

Two passes: random valid and invalid requests to every operation (job ids mostly unknown,
so mostly the 404/422 paths), then the job-scoped operations fuzzed around real jobs (one
finished, one canceled) so that their 200 and 409 answers are checked as well. The API
runs with an API key, as in production; valid cases carry it, invalid ones may drop it.
Both passes are derandomized: the same cases every run.

A third pass looks somewhere new each run: every operation of an open API (no keys, so the
schema's optional security is exercised too) fuzzed with fresh random seeds, printed at the
start of the test and in any failure. Replay one with `DDPM_FUZZ_SEED=<seed>` (several:
comma-separated); `DDPM_FUZZ_RUNS` sets how many fresh seeds a run takes (3).

Valid cases must also be accepted: a `422` to a request the schema allows means the schema
says less than the API enforces (only the refusals the schema cannot state are let through:
a webhook host off the allow-list, an Idempotency-Key reused with another body).
"""

from __future__ import annotations

import io
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.configuration
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from PIL import Image
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.auth import new_key
from app.routes.generations import EVENT_ID_PATTERN
from contract.limits import INPUT_FIELDS

EXCEPTION_LINE = re.compile(r"^[ |+-]*([A-Za-z_][\w.]*(?:Error|Exception)(?:: .*)?)$",
                            re.MULTILINE)
TERMINAL = re.compile(r"^event: (done|error|canceled)$", re.MULTILINE)


def stream_ends(ctx: object, response: schemathesis.Response, case: Case) -> None:
    """A 200 event stream closes only after a terminal event (the fuzz streams only jobs
    that have ended, so each stream must end, and with one)."""
    if response.status_code == 200 and case.operation.path.endswith("/events"):
        text = response.content.decode(errors="replace")
        assert TERMINAL.search(text), f"the stream closed without a terminal event: {text!r:.300}"


# 422s that depend on state the schema cannot describe.
STATEFUL_REFUSALS = {("webhook", "not allowed"), ("Idempotency-Key", "different request body"),
                     ("model", "is required"),   # optional only while one model is served
                     # /v1/images (400s): a prompt is a class of the model it names, the
                     # size the model's own, guidance needs such a prompt
                     ("prompt", "is not a class"), ("prompt", "is unconditional"),
                     ("size", "must be"), ("guidance_scale", "needs a prompt")}


# 422s for content a JSON Schema cannot describe: an image's bytes (base64 or a file part),
# the multipart `request` part's JSON, a field sent both ways.
CONTENT_FIELDS = {"request", *INPUT_FIELDS, "image"}   # /v1/images: `image` and `mask`
# 422s (OpenAI: 400s) that depend on the served model, which the schema's descriptions
# state and the README lists (GenerationSpec.check_model, check_stream_budget): steps past
# its T or what the strength leaves of it, a class it does not have, snapshots larger than
# its images or, at its size, more than a job's stream holds.
MODEL_REFUSALS = {("steps", "timesteps that strength"), ("steps", "exceeds the model's"),
                  ("class_label", "must be <"), ("class_label", "is unconditional"),
                  ("snapshot_size", "exceeds the model's"),
                  ("snapshot_every", "a job's event stream holds"),
                  ("partial_images", "this server's event streams hold")}


def schema_accepts(ctx: object, response: schemathesis.Response, case: Case) -> None:
    """A request the schema allows is not refused as invalid (schemathesis's own
    positive_data_acceptance also counts 404s of unknown ids and models, which are right).
    The OpenAI-compatible routes refuse with OpenAI's 400 naming the `param`."""
    openai = case.operation.path.startswith("/v1/images/")
    if response.status_code != (400 if openai else 422):
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {}
    field = error.get("param" if openai else "field")
    message = str(error.get("message", ""))
    if field in CONTENT_FIELDS or "given twice" in message:
        return
    assert any(field == f and m in message for f, m in STATEFUL_REFUSALS | MODEL_REFUSALS), (
        f"a request the schema allows was refused: {response.status_code} {field}: {message}")


# Every response must pass these; responses to invalid requests must also be refusals, and
# responses to valid ones must not be 422s.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, stream_ends]
POSITIVE_CHECKS = [*CHECKS, schema_accepts]
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]

EXAMPLES = 100             # cases per operation and generation mode in the broad pass
JOB_EXAMPLES = 30          # cases per job-scoped operation and real job
REQUEST_TIMEOUT = 15.0     # connect/read timeout of each request (SSE streams included)
FRESH_EXAMPLES = 15        # cases per operation, generation mode and fresh seed
WATCHDOG_S = 150.0         # past this the API is killed: a hang fails instead of blocking

KEY, DIGEST = new_key()

# Last-Event-ID values at the edges: before everything, the largest id Redis accepts, and
# ids whose parts overflow Redis's unsigned 64-bit stream ids.
EDGE_EVENT_IDS = ["0", "0-0", "18446744073709551615-18446744073709551615",
                  "18446744073709551616-0", "99999999999999999999"]

# The operations the API has today; any new one in the schema is fuzzed as well.
KNOWN = {
    "POST /v1/generations", "GET /v1/generations/{job_id}",
    "DELETE /v1/generations/{job_id}", "GET /v1/generations/{job_id}/images/{index}",
    "GET /v1/generations/{job_id}/inputs/{name}",
    "GET /v1/generations/{job_id}/grid.png", "GET /v1/generations/{job_id}/animation.gif",
    "GET /v1/generations/{job_id}/events", "GET /v1/models", "GET /v1/models/{name}",
    "GET /healthz", "GET /readyz", "GET /metrics",
    "POST /v1/images/generations", "POST /v1/images/edits", "POST /v1/images/variations",
}


def _settings(max_examples: int, seed: int | None = None) -> hypothesis.settings:
    """Reproducible (derandomized, or from `seed`), no example database, no shrinking
    (bounded time)."""
    return hypothesis.settings(
        max_examples=max_examples, derandomize=seed is None, database=None, deadline=None,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
        print_blob=False)


def fresh_seeds() -> list[int]:
    """`DDPM_FUZZ_SEED` (comma-separated) to replay; otherwise `DDPM_FUZZ_RUNS` new ones."""
    given_seeds = os.environ.get("DDPM_FUZZ_SEED", "").strip()
    if given_seeds:
        return [int(s) for s in given_seeds.split(",")]
    return [secrets.randbits(32) for _ in range(int(os.environ.get("DDPM_FUZZ_RUNS", "3")))]


class _Key:
    """schemathesis auth provider: valid cases carry the API key (it leaves the header
    off where a negative case removes it on purpose)."""

    def get(self, case: Case, context: object) -> str:
        return KEY

    def set(self, case: Case, data: str, context: object) -> None:
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


@dataclass
class Stack:
    """The API under test; `fuzz` records every distinct failure instead of stopping."""

    url: str
    schema: Any
    log_path: Path
    inputs: dict[str, bool]                      # operation → has parameters, body or auth
    calls: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, set[int]] = field(default_factory=dict)
    failures: dict[tuple[str, ...], list[Any]] = field(default_factory=dict)
    logged: int = 0                              # tracebacks in the API log so far
    previous: str = ""                           # the last request, as curl

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def operations(self) -> dict[str, Any]:
        ops = {}
        for result in self.schema.get_all_operations():
            assert isinstance(result, Ok), f"schemathesis cannot use the schema: {result}"
            ops[result.ok().label] = result.ok()
        return ops

    def check(self, case: Case, mode: GenerationMode, what: str) -> None:
        """Send `case` and run the checks; keep the first example of each distinct failure
        (operation, failed checks, status) and count the others."""
        label = case.operation.label
        try:
            response = case.call(base_url=self.url, timeout=REQUEST_TIMEOUT)
        except Exception as e:  # a timeout or a dropped connection is a finding too
            self._record((label, type(e).__name__), f"{label} ({what}): {e!r}\n"
                         f"    {case.as_curl_command()}")
            return
        self.calls[label] = self.calls.get(label, 0) + 1
        self.statuses.setdefault(label, set()).add(response.status_code)
        curl = case.as_curl_command()
        if "event-stream" in response.headers.get("content-type", [""])[0]:
            time.sleep(0.05)        # a stream's teardown ends just after its last byte
        logged = self.log().count("Traceback")
        if logged > self.logged:    # no 5xx reaches the client once a stream has begun
            self.logged = logged
            self._record((label, "logged exception"),
                         f"{label} ({what}): answered {response.status_code}, and the API "
                         "logged an unhandled exception (see below) during this request:\n"
                         f"    {curl}\nor the one before:\n    {self.previous}")
        self.previous = curl
        try:
            case.validate_response(
                response, checks=NEGATIVE_CHECKS if mode.is_negative else POSITIVE_CHECKS,
                transport_kwargs={"base_url": self.url, "timeout": REQUEST_TIMEOUT})
        except BaseExceptionGroup as group:
            codes = sorted({f.code for f in group.exceptions if isinstance(f, Failure)})
            self._record((label, *codes, str(response.status_code)),
                         f"{label} ({what}):\n{group}")

    def _record(self, key: tuple[str, ...], report: str) -> None:
        first = self.failures.setdefault(key, [report, 0])
        first[1] += 1

    def fuzz(self, op: Any, mode: GenerationMode, examples: int, what: str = "",
             seed: int | None = None, **fixed: Any) -> None:
        """`examples` generated cases of `op` (some parameters `fixed`), each checked; the
        same ones each run unless a `seed` is given."""
        strategy = op.as_strategy(generation_mode=mode, **fixed)
        if op.label == "POST /v1/generations" and mode.is_positive:
            strategy = st.one_of(strategy, strategy.map(_served))
        elif op.label.startswith("POST /v1/images/") and mode.is_positive:
            strategy = st.one_of(strategy, strategy.map(_served_images))
        desc = f"{mode.value}{what}"

        @_settings(examples, seed)
        @given(case=strategy)
        def run(case: Case) -> None:
            self.check(case, mode, desc)

        if seed is not None:
            run = hypothesis.seed(seed)(run)
        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # Nothing invalid to send (the only input is a path string that may be anything,
            # and no key is required): the valid cases cover the operation.
            if not mode.is_negative:
                raise

    def assert_clean(self, replay: str = "") -> None:
        """Fail with every distinct finding, plus any exception the API only logged (one
        raised after a streaming response began never becomes a 5xx a client sees)."""
        log = self.log()
        reports = [f"[{n} case(s)] {report}" for report, n in self.failures.values()]
        if log.count("Traceback") > self.logged:
            reports.append("the API logged unhandled exceptions after the last request")
        if reports:
            raised = sorted(set(EXCEPTION_LINE.findall(log)))
            pytest.fail(f"{len(reports)} distinct fuzz failure(s){replay}:\n\n"
                        + "\n\n".join(reports)
                        + "\n\n--- exceptions in the API log ---\n" + "\n".join(raised)
                        + f"\n(full log: {self.log_path})", pytrace=False)


def _inputs(doc: dict[str, Any]) -> dict[str, bool]:
    """Which operations take any input (schemathesis cannot make those without invalid);
    an optional security requirement (`{}` among them: the API is open) is none."""
    out = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            security = op.get("security") or []
            out[f"{method.upper()} {path}"] = bool(
                op.get("parameters") or op.get("requestBody") or item.get("parameters")
                or (security and {} not in security))
    return out


@pytest.fixture
def stack(spawn_worker: Callable[..., Any], start_api: Callable[..., Any],
          wait_for: Callable[..., object]) -> Iterator[Stack]:
    """A worker serving `tiny` and `tinycond`, and an API with a key, a shallow queue (the
    fuzz's jobs get 429 instead of piling up) and no rate limit (submits reach the queue)."""
    yield from _stack(spawn_worker, start_api, wait_for, keyed=True)


@pytest.fixture
def open_stack(spawn_worker: Callable[..., Any], start_api: Callable[..., Any],
               wait_for: Callable[..., object]) -> Iterator[Stack]:
    """The same without API keys: the API open, as `ddpm serve` runs it by default."""
    yield from _stack(spawn_worker, start_api, wait_for, keyed=False)


def _stack(spawn_worker: Callable[..., Any], start_api: Callable[..., Any],
           wait_for: Callable[..., object], keyed: bool) -> Iterator[Stack]:
    worker = spawn_worker()
    api = start_api(env={**({"DDPM_API_KEYS": DIGEST} if keyed else {}),
                         "DDPM_MAX_QUEUE_DEPTH": "2", "DDPM_RATE_LIMIT": "0"})
    wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200, 120,
             "the worker to register", worker=worker)
    doc = httpx.get(f"{api.url}/openapi.json", timeout=10).json()
    # Event streams are read to their end (schemathesis stops after 20 events by default):
    # a client leaving mid-stream is not what this test is about.
    config = schemathesis.Config.from_dict({"seed": 0, "max-stream-events": 100_000})
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config, timeout=10)
    if keyed:
        schema.auth(refresh_interval=None)(_Key)
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        api.proc.kill()

    watchdog = threading.Timer(WATCHDOG_S, kill)
    watchdog.start()
    yield Stack(api.url, schema, api.log_path, _inputs(doc))
    watchdog.cancel()
    assert not fired.is_set(), f"the fuzz ran past {WATCHDOG_S:.0f} s (a request hung?)"


def _served(case: Case) -> Case:
    """Point a valid submission at a served model, with few steps and images: otherwise
    nearly every one stops at 404 (unknown model) and the enqueue path never runs."""
    body = case.body
    if isinstance(body, dict) and "model" in body:
        conditional = body.get("class_label") is not None
        body["model"] = "tinycond" if conditional else "tiny"
        if conditional:
            body["class_label"] %= 10
        body["steps"] = min(body.get("steps", 2), 3)
        body["num_images"] = min(body.get("num_images", 1), 2)
        body["snapshot_every"] = min(body.get("snapshot_every", 0), 2)
        if body.get("snapshot_size") is not None:     # at most the model's 16 pixels
            body["snapshot_size"] = min(body["snapshot_size"], 16)
    return case


def _tiny_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


def _served_images(case: Case) -> Case:
    """The same for the OpenAI-compatible routes: a served model, a prompt it takes, real
    images of one size, few steps and images; so their waits and answers are fuzzed too."""
    body = case.body
    if isinstance(body, dict) and "model" in body:
        prompt = str(body.get("prompt", ""))
        conditional = prompt.strip() or body.get("guidance_scale") not in (None, 1)
        body["model"] = "tinycond" if conditional else "tiny"
        if "prompt" in body or conditional:
            body["prompt"] = str(len(prompt) % 10) if conditional else ""
        body.pop("size", None)
        body["steps"] = min(body.get("steps") or 2, 3)
        body["n"] = min(body.get("n") or 1, 2)
        for part in ("image", "mask"):
            if part in body:
                body[part] = _tiny_png(len(part))
    return case


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_every_operation_survives_fuzzing(stack: Stack) -> None:
    """Random valid and invalid requests to every operation: no 5xx, nothing undocumented."""
    ops = stack.operations()
    assert set(ops) >= KNOWN, f"operations missing from the schema: {KNOWN - set(ops)}"
    for label, op in ops.items():
        stack.fuzz(op, GenerationMode.POSITIVE, EXAMPLES)
        if stack.inputs[label]:
            stack.fuzz(op, GenerationMode.NEGATIVE, EXAMPLES)
    unreached = {label for label in ops if not stack.calls.get(label)}
    assert not unreached, f"the fuzz sent nothing to {unreached}"
    # The valid submissions got past validation to the queue (202, or 429 once it is full).
    assert stack.statuses["POST /v1/generations"] & {202, 429}, stack.statuses
    for path in ("generations", "edits", "variations"):    # waited for real jobs
        assert stack.statuses[f"POST /v1/images/{path}"] & {200, 429}, stack.statuses
    assert 401 in stack.statuses["GET /v1/models"], "no case went without the key"
    stack.assert_clean()


def _submit(url: str, **body: Any) -> str:
    resp = httpx.post(f"{url}/v1/generations", json=body, headers=_headers(), timeout=10)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _status(url: str, job_id: str) -> str:
    resp = httpx.get(f"{url}/v1/generations/{job_id}", headers=_headers(), timeout=10)
    return str(resp.json()["status"])


def test_job_operations_survive_fuzzing_on_real_jobs(
        stack: Stack, wait_for: Callable[..., object]) -> None:
    """The job-scoped operations fuzzed with the ids of a finished and a canceled job, so
    their 200 (status, images, grid, animation, events) and 409 (cancel) answers are
    checked against the schema too, not only the 404s of unknown ids."""
    done = _submit(stack.url, model="tiny", num_images=2, steps=3, seed=1, snapshot_every=1)
    wait_for(lambda: _status(stack.url, done) == "succeeded", 60, f"job {done} to succeed")
    canceled = _submit(stack.url, model="tinycond", num_images=1, steps=1000, seed=2,
                       class_label=3)
    resp = httpx.delete(f"{stack.url}/v1/generations/{canceled}", headers=_headers(),
                        timeout=10)
    assert resp.status_code == 200, resp.text
    wait_for(lambda: _status(stack.url, canceled) == "canceled", 30, f"job {canceled} canceled")

    ops = {label: op for label, op in stack.operations().items() if "{job_id}" in label}
    assert len(ops) == 7, sorted(ops)
    for job_id, what in ((done, "succeeded job"), (canceled, "canceled job")):
        for label, op in ops.items():
            stack.fuzz(op, GenerationMode.POSITIVE, JOB_EXAMPLES, f", {what}",
                       path_parameters={"job_id": job_id})
            params = {"job_id": job_id, **({"index": 0} if "{index}" in label else {}),
                      **({"name": "init_image"} if "{name}" in label else {})}
            stack.check(op.Case(path_parameters=params, headers=_headers()),
                        GenerationMode.POSITIVE, f"{what}, explicit")
        # Resume points at the edges of what an event id can be (Redis: two u64 parts);
        # those past them are invalid by the schema's pattern as well.
        for last in EDGE_EVENT_IDS:
            mode = (GenerationMode.POSITIVE if re.fullmatch(EVENT_ID_PATTERN, last)
                    else GenerationMode.NEGATIVE)
            stack.check(ops["GET /v1/generations/{job_id}/events"].Case(
                path_parameters={"job_id": job_id},
                headers={**_headers(), "Last-Event-ID": last}),
                mode, f"{what}, Last-Event-ID {last}")
    # The happy paths were really taken, not only 404s.
    seen = stack.statuses
    for label in ("GET /v1/generations/{job_id}", "GET /v1/generations/{job_id}/images/{index}",
                  "GET /v1/generations/{job_id}/grid.png",
                  "GET /v1/generations/{job_id}/animation.gif",
                  "GET /v1/generations/{job_id}/events"):
        assert 200 in seen[label], (label, seen[label])
    assert 409 in seen["DELETE /v1/generations/{job_id}"], seen
    stack.assert_clean()


def test_fresh_seeds_survive_fuzzing(open_stack: Stack,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Every operation of an open API with fresh seeds: cases no earlier run has sent."""
    seeds = fresh_seeds()
    replay = (f" (seeds {', '.join(map(str, seeds))}; replay: DDPM_FUZZ_SEED="
              f"{','.join(map(str, seeds))} pytest tests/app/test_fuzz.py -k fresh)")
    with capsys.disabled():
        print(f"\nfuzz{replay}", flush=True)
    ops = open_stack.operations()
    for seed in seeds:
        for label, op in ops.items():
            open_stack.fuzz(op, GenerationMode.POSITIVE, FRESH_EXAMPLES, f", seed {seed}", seed)
            if open_stack.inputs[label]:
                open_stack.fuzz(op, GenerationMode.NEGATIVE, FRESH_EXAMPLES, f", seed {seed}",
                                seed)
    assert not {label for label in ops if not open_stack.calls.get(label)}
    open_stack.assert_clean(replay)
