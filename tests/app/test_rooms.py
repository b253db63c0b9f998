"""The API's rooms and its Redis cost, against a real Redis and a real API process: one model
lookup (one refusal on both fronts), the OpenAI routes bounded by `GenerationSpec`'s own
fields, a submission that writes RQ's layout exactly in fewer commands (one HSET of the
job hash, one expiry per fixed-window key), an idle event stream that backs off
instead of polling the job's status every interval, and a job's lookup sent with its
first read (one round trip for an image, one for a finished job's stream).

No worker runs: a worker advertisement lets the API accept the model; jobs stay queued.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis
from test_lean_api import advertise
from websockets.sync.client import connect

from app.openai.models import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
)
from contract.events import Event, EventType
from contract.keys import events_key, image_key, wake_key
from contract.queueing import enqueue, job_key
from contract.rules import bounds
from contract.spec import GenerationSpec


@contextmanager
def monitored(r: redis.Redis) -> Iterator[list[dict[str, Any]]]:
    """Every command Redis runs while the block runs (MONITOR), scripts' included, each as
    redis-py parses it (`command`: the command and its arguments; `client_type`)."""
    seen: list[dict[str, Any]] = []
    started, stopped = threading.Event(), threading.Event()

    def listen() -> None:
        with r.monitor() as m:
            for cmd in m.listen():
                if cmd["command"] == "ECHO monitor-start":
                    started.set()
                elif cmd["command"] == "ECHO monitor-stop":
                    stopped.set()
                    return
                elif started.is_set():
                    seen.append(cmd)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    while not started.is_set():
        r.echo("monitor-start")
        started.wait(0.05)
    try:
        yield seen
    finally:
        r.echo("monitor-stop")
        thread.join(timeout=30)


def _post(c: httpx.Client, **body: Any) -> str:
    resp = c.post("/v1/generations", json={"model": "tiny", "steps": 2, **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


# -- one lookup ------------------------------------------------------------------------------


def test_an_unknown_model_is_refused_in_the_same_words_on_both_fronts(
        start_api: Callable[..., Any], r: redis.Redis) -> None:
    api = start_api({"DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        native = c.post("/v1/generations", json={"model": "nope"})
        openai = c.post("/v1/images/generations", json={"model": "nope"})
    assert native.status_code == openai.status_code == 404, (native.text, openai.text)
    assert native.json()["error"]["field"] == openai.json()["error"]["param"] == "model"
    assert openai.json()["error"]["code"] == "model_not_found"
    message = native.json()["error"]["message"]
    assert "'nope'" in message and "tiny" in message
    assert openai.json()["error"]["message"] == message


# -- bounds from the spec --------------------------------------------------------------------

SHARED = [(ImageGenerationRequest, "n", "num_images"), (ImageGenerationRequest, "steps", "steps"),
          (ImageGenerationRequest, "seed", "seed"),
          (ImageGenerationRequest, "guidance_scale", "guidance_scale"),
          (ImageEditRequest, "strength", "strength"),
          (ImageEditRequest, "jump_length", "jump_length"),
          (ImageEditRequest, "jump_n_sample", "jump_n_sample"),
          (ImageVariationRequest, "n", "num_images"),
          (ImageVariationRequest, "strength", "strength")]


@pytest.mark.parametrize(("model", "field", "spec_field"), SHARED)
def test_openai_bounds_are_the_specs(model: Any, field: str, spec_field: str) -> None:
    want = bounds(GenerationSpec, spec_field)
    assert want, spec_field
    assert bounds(model, field) == want
    schema = model.model_json_schema()["properties"][field]
    number = next(a for a in schema["anyOf"] if a.get("type") in ("integer", "number"))
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    assert {k: number[names[k]] for k in want} == want


def test_openai_n_past_the_specs_bound_is_a_400_naming_n(start_api: Callable[..., Any],
                                                          r: redis.Redis) -> None:
    api = start_api({"DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    over = bounds(GenerationSpec, "num_images")["le"] + 1
    with httpx.Client(base_url=api.url, timeout=30) as c:
        resp = c.post("/v1/images/generations", json={"model": "tiny", "n": over})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n", resp.text


# -- what a submission writes ----------------------------------------------------------------


def _script_writes(seen: list[dict[str, Any]]) -> list[list[str]]:
    return [_args(cmd) for cmd in seen if cmd["client_type"] == "lua"]


def _args(cmd: dict[str, Any]) -> list[str]:
    """A monitored command's words, its name upper-cased (an argument with a space in it
    splits: only names and keys are read)."""
    name, *rest = cmd["command"].split(" ")
    return [name.upper(), *rest]


def test_a_submission_writes_rqs_layout_with_one_hset_and_one_expiry_per_window(
        start_api: Callable[..., Any], r: redis.Redis) -> None:
    """The job hash holds exactly the fields RQ's own enqueue writes, in one HSET; the rate
    counter and the wake list get their expiry when created, not with each submission."""
    api = start_api({"DDPM_RATE_LIMIT": "1000"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        _post(c)                                       # loads the script, reads the models
        r.delete(wake_key("tiny"))
        with monitored(r) as seen:
            ids = [_post(c, seed=i) for i in range(3)]
    writes = _script_writes(seen)
    for job_id in ids:
        hsets = [w for w in writes if w[0] == "HSET" and w[1] == job_key(job_id)]
        assert len(hsets) == 1, hsets
    expired = [w[1] for w in writes if w[0] == "EXPIRE"]
    assert expired.count(wake_key("tiny")) == 1, expired          # created once, no worker
    assert not [k for k in expired if k.startswith("ddpm:rate:")], expired   # made earlier
    assert r.llen(wake_key("tiny")) == 3 and 0 < r.ttl(wake_key("tiny")) <= 60
    # RQ's own enqueue of the same kind of job leaves the same fields.
    own = enqueue(r, GenerationSpec(model="tiny", steps=2), meta={"owner": "x"})
    ours = {k.decode() for k in r.hkeys(job_key(ids[0]))}
    assert ours == {k.decode() for k in r.hkeys(job_key(own.id))}
    assert r.hget(job_key(ids[0]), "status") == b"queued"


def test_the_wake_list_stays_bounded(start_api: Callable[..., Any], r: redis.Redis) -> None:
    from contract.keys import WAKE_MAXLEN

    api = start_api({"DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=30) as c:
        for i in range(WAKE_MAXLEN + 5):
            _post(c, seed=i)
    assert r.llen(wake_key("tiny")) == WAKE_MAXLEN
    assert 0 < r.ttl(wake_key("tiny")) <= 60


# -- an idle stream --------------------------------------------------------------------------


def test_an_idle_event_stream_backs_off(start_api: Callable[..., Any], r: redis.Redis,
                                        wait_for: Callable[..., object]) -> None:
    """A queued job's stream: each idle XREAD BLOCK is followed by one status read, and the
    next block is twice as long, up to 4 poll intervals; the stream still ends with the
    job's cancellation. The first read is a look without BLOCK sent with the job's lookup
    (one round trip); finding nothing, it is not counted as an idle poll."""
    api = start_api({"DDPM_RATE_LIMIT": "0", "DDPM_STREAM_POLL_MS": "50"})
    advertise(r, "tiny")
    events: list[str] = []
    with httpx.Client(base_url=api.url, timeout=60) as c:
        job = _post(c)

        def follow() -> None:
            with c.stream("GET", f"/v1/generations/{job}/events") as resp:
                events.extend(line for line in resp.iter_lines() if line.startswith("event:"))

        with monitored(r) as seen:
            reader = threading.Thread(target=follow, daemon=True)
            reader.start()

            def blocks() -> list[int]:
                return [int(a[a.index("BLOCK") + 1]) for a in map(_args, list(seen))
                        if a[0] == "XREAD" and "BLOCK" in a]

            wait_for(lambda: len(blocks()) >= 6, 60, "six XREADs of the idle stream")
            assert c.delete(f"/v1/generations/{job}").status_code == 200
            reader.join(timeout=60)
    got = blocks()
    assert got[:5] == [50, 100, 200, 200, 200], got
    reads = [a[0] if a[0] != "XREAD" or "BLOCK" in a else "XREAD-look"
             for a in (_args(cmd) for cmd in seen if cmd["client_type"] != "lua")]
    xreads = [i for i, name in enumerate(reads) if name == "XREAD"]
    assert reads[:xreads[0]][-2:] == ["HGETALL", "XREAD-look"], reads[:xreads[0]]
    idle = reads[xreads[0]:xreads[4]]                  # four idle polls: one status read each
    assert idle == ["XREAD", "HGET"] * 4, idle
    assert events == ["event: canceled"], events


# -- a lookup and its read in one round trip -------------------------------------------------


def _reads(r: redis.Redis) -> int:
    """Reads Redis has served so far (a read is one round trip's batch of commands)."""
    return int(r.info("stats")["total_reads_processed"])


def _round_trips(r: redis.Redis, request: Callable[[], object]) -> int:
    """Round trips `request` made to Redis: the reads between two INFOs, less what two
    INFOs with nothing between them count (no worker runs and the API polls nothing)."""
    a, b = _reads(r), _reads(r)
    before = _reads(r)
    request()
    return _reads(r) - before - (b - a)


def test_an_image_and_a_finished_stream_cost_one_round_trip_each(
        start_api: Callable[..., Any], r: redis.Redis) -> None:
    """The image GET sends the job's lookup and the image's read together; an event stream
    (SSE or WebSocket) sends the lookup with a look at the stream (no BLOCK), which, for a
    job that has ended, holds every event: one round trip each (two before), with the same
    answers."""
    api = start_api({"DDPM_RATE_LIMIT": "0"})
    advertise(r, "tiny")
    png = b"\x89PNG\r\n\x1a\n" + b"stored"
    with httpx.Client(base_url=api.url, timeout=60) as c:
        job = _post(c)
        r.set(image_key(job, 0), png)
        r.xadd(events_key(job), Event(EventType.DONE, {"num_images": 1}).to_fields())
        got: list[httpx.Response] = []
        assert _round_trips(r, lambda: got.append(c.get(f"/v1/generations/{job}/images/0"))) == 1
        assert got[-1].status_code == 200 and got[-1].content == png
        assert _round_trips(r, lambda: got.append(c.get(f"/v1/generations/{job}/events"))) == 1
        assert got[-1].status_code == 200
        assert [ln for ln in got[-1].text.splitlines() if ln.startswith("event:")] == [
            "event: done"], got[-1].text
        ws_url = api.url.replace("http://", "ws://") + f"/v1/generations/{job}/ws"
        messages: list[dict[str, Any]] = []

        def over_ws() -> None:
            with connect(ws_url, open_timeout=10) as ws:
                messages.append(json.loads(ws.recv(timeout=30)))

        assert _round_trips(r, over_ws) == 1
        assert [m["event"] for m in messages] == ["done"]
        # the answers a lookup gives stay: another's job, an unknown one, an index past the end
        assert c.get(f"/v1/generations/{job}/images/1").status_code == 404
        assert c.get("/v1/generations/nosuchjob/images/0").status_code == 404
        assert c.get("/v1/generations/nosuchjob/events").status_code == 404
