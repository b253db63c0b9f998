"""`ddpm_client` against a live stack: its own Redis, a `ddpm worker` serving the tiny test
models and a `ddpm api` process (`stack`, conftest.py); the client talks real HTTP,
sync and async. Event streams are cut mid-event by a TCP proxy to check that the client
resumes them with `Last-Event-ID` and neither misses nor repeats an event."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import ddpm_client as dc
import numpy as np
import pytest
import redis
from PIL import Image

from contract.keys import events_key
from ddpm.redis_server import free_port
from tests.client.conftest import Stack
from tests.conftest import ApiProcess

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16                    # the `tiny` models: 16×16 RGB
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEY = "client-test-key"
T = 30      # every wait and stream is bounded: a client bug fails a test, never hangs it


@pytest.fixture
def client(stack: Stack) -> Iterator[dc.Client]:
    with dc.Client(stack.url, retry_backoff=0.05) as c:
        yield c


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def stream_entries(r: redis.Redis, job_id: str) -> list[tuple[str, str, dict]]:
    """(id, type, fields) of the job's Redis Stream: the full stream, the ground truth."""
    out = []
    for entry_id, fields in r.xrange(events_key(job_id)):
        f = {k.decode(): v for k, v in fields.items()}
        out.append((entry_id.decode(), f["type"].decode(), f))
    return out


def frame(fields: dict) -> bytes:
    """A snapshot entry's encoded frame (`png`: written before frame formats)."""
    return bytes(fields.get("image", fields.get("png")))


# -- submit, wait, download --------------------------------------------------------------


def test_models_submit_wait_download(client: dc.Client, stack: Stack) -> None:
    models = {m.name: m for m in client.models()}
    assert models["tiny"].image_size == SIZE and models["tiny"].in_channels == 3
    assert models["tinycond"].num_classes == 10 and models["tiny"].workers == 1
    assert client.model("tinycond") == models["tinycond"]

    job = client.submit(model="tiny", num_images=2, steps=6, seed=7, sampler=None)
    assert isinstance(job, dc.Generation) and job.seed == 7
    assert job.request["sampler"] == "dpm++2m"           # None: the server's default
    done = client.wait(job.id, timeout=T)
    assert done.status == "succeeded" and done.done and done.finished_at is not None
    assert done.progress == dc.Progress(12, 12, 1.0, 2, 2, 6, (6, 6))
    pngs = client.images(job.id)
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert client.image(job.id, 1) == pngs[1]
    assert client.image_pil(job.id, 0).size == (SIZE, SIZE)
    assert Image.open(io.BytesIO(client.grid(job.id))).size[0] > SIZE * 2
    # generate = submit + wait + download: the same request and seed, the same pixels.
    result = client.generate(model="tiny", num_images=2, steps=6, seed=7, timeout=T)
    assert result.generation.id != job.id and result.generation.succeeded
    assert list(result.images) == pngs
    assert [im.size for im in result.pil()] == [(SIZE, SIZE)] * 2


def test_async_client(stack: Stack) -> None:
    async def run() -> tuple[list[dc.Result], list[dc.Event], list[dc.Frame], str]:
        async with dc.AsyncClient(stack.url, retry_backoff=0.05) as c:
            assert "tiny" in {m.name for m in await c.models()}
            results = await asyncio.gather(*(c.generate(model="tiny", steps=4, seed=s, timeout=T)
                                             for s in (1, 2, 1)))
            job = await c.submit(model="tinycond", class_label=3, num_images=2, steps=6,
                                 snapshot_every=2, seed=5)
            events = [ev async for ev in c.events(job.id, timeout=T)]
            frames = [f async for f in c.frames(job.id, timeout=T)]
            done = await c.wait(job.id, timeout=T)
            assert done.succeeded and await c.images(job.id) == [
                await c.image(job.id, i) for i in range(2)]
            return list(results), events, frames, job.id

    results, events, frames, job_id = asyncio.run(run())
    assert all(r.generation.succeeded for r in results)
    assert results[0].images == results[2].images != results[1].images   # seeds decide
    truth = stream_entries(stack.redis, job_id)
    assert [(e.id, str(e.type)) for e in events] == [(i, t) for i, t, _ in truth]
    assert events[0].type == dc.EventType.STARTED and events[-1].type == dc.EventType.DONE
    # Snapshots every 2 of 6 steps, for each of the 2 images, frames in step order.
    assert [(f.index, f.step) for f in frames if f.index == 0] == [(0, 2), (0, 4)]
    assert len(frames) == 4 and all(f.pil().size == (SIZE, SIZE) for f in frames)
    assert [f.image for f in frames] == [frame(f) for _, t, f in truth if t == "snapshot"]
    assert all(f.format == "png" and f.png == f.image for f in frames)   # a 16-pixel model


def _encoded(fmt: str, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 90)).save(buf, fmt.upper())
    return buf.getvalue()


def _snapshot(data: dict) -> dc.Event:
    return dc.Event.parse("snapshot", data, "1-0")


def test_frames_of_every_format_and_of_older_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server: a snapshot's frame is `image` in its `format`, `png` converts a lossy one
    (Pillow) and is the frame itself when it is a PNG; an older server's `png` frames
    still read; without Pillow the conversion says what to do."""
    from ddpm_client._core import frame_of

    jpeg, png = _encoded("jpeg"), _encoded("png")
    ev = _snapshot({"index": 1, "step": 4, "kind": "xt", "format": "jpeg", "size": 8,
                    "dropped": 2, "image": base64.b64encode(jpeg).decode()})
    assert ev.image == jpeg and ev.format == "jpeg" and ev.png is None
    f = frame_of(ev)
    assert f is not None and (f.index, f.step, f.kind) == (1, 4, "xt")
    assert (f.image, f.format, f.size, f.dropped, f.event_id) == (jpeg, "jpeg", 8, 2, "1-0")
    assert f.png.startswith(PNG_MAGIC) and f.pil().size == (8, 8) and f.pil().format == "JPEG"
    assert Image.open(io.BytesIO(f.png)).size == (8, 8)
    for data in ({"index": 0, "step": 2, "format": "png", "size": 8,
                  "image": base64.b64encode(png).decode()},
                 {"index": 0, "step": 2, "png": base64.b64encode(png).decode()}):   # older
        ev = _snapshot(data)
        assert ev.image == ev.png == png and ev.format == "png"
        f = frame_of(ev)
        assert f is not None and f.format == "png" and f.png == f.image == png
    inline = dc.Event.parse("image", {"index": 0, "url": "/u",
                                      "png": base64.b64encode(png).decode()}, "2-0")
    assert inline.png == png and frame_of(inline) is None
    lossy = frame_of(_snapshot({"format": "webp", "image": base64.b64encode(
        _encoded("webp")).decode()}))
    assert lossy is not None
    monkeypatch.setitem(sys.modules, "PIL", None)          # Pillow not installed
    with pytest.raises(ImportError, match="Pillow"):
        _ = lossy.png


def test_lossy_frames_reach_the_client_and_ddpm_generate(client: dc.Client, stack: Stack,
                                                          tmp_path: Path) -> None:
    job = client.submit(model="tiny", num_images=2, steps=6, snapshot_every=2, seed=3,
                        snapshot_format="webp", snapshot_size=8)
    frames = list(client.frames(job.id, timeout=T))
    assert sorted((f.index, f.step) for f in frames) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    for f in frames:
        assert f.format == "webp" and f.size == 8 and f.image.startswith(b"RIFF")
        assert f.pil().size == (8, 8) and f.png.startswith(PNG_MAGIC)
    out = tmp_path / "out"
    run = ddpm("generate", "--server", stack.url, "--model", "tiny", "--num-images", "2",
               "--steps", "6", "--seed", "9", "--out", str(out), "--stream",
               "--snapshot-every", "3", "--snapshot-format", "jpeg", "--snapshot-size", "8")
    assert run.returncode == 0, run.stderr
    written = sorted((out / "frames").iterdir())
    assert [p.name for p in written] == ["0000-0003.jpg", "0001-0003.jpg"]
    assert all(Image.open(p).format == "JPEG" and Image.open(p).size == (8, 8)
               for p in written)
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png"]


def test_cancel(client: dc.Client) -> None:
    job = client.submit(model="tiny", steps=1000, seed=1)
    with pytest.raises(dc.WaitTimeout):
        client.wait(job.id, timeout=0.2)           # 1000 steps take seconds: still going
    events = client.events(job.id, timeout=T)
    for ev in events:                                # running: its first steps are done
        if ev.type == dc.EventType.PROGRESS:
            break
    canceled = client.cancel(job.id)
    assert canceled.status == "canceled"
    rest = list(events)                              # the same stream goes on to the end
    assert rest[-1].type == dc.EventType.CANCELED and rest[-1].terminal
    assert not any(e.type == dc.EventType.DONE for e in rest)
    assert client.wait(job.id, timeout=T).status == "canceled"
    with pytest.raises(dc.GenerationError) as info:
        client.result(job.id)
    assert info.value.generation.status == "canceled"
    with pytest.raises(dc.ConflictError) as again:
        client.cancel(job.id)
    assert again.value.status == 409 and again.value.code == "conflict"


# -- image-conditioned -------------------------------------------------------------------


def test_inpainting_with_images_as_pil_path_and_bytes(client: dc.Client,
                                                      tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[SIZE // 2:] = 255                           # white: generate the lower half
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_path)
    buf = io.BytesIO()
    image.save(buf, format="PNG")

    as_files = client.generate(model="tiny", init_image=image, mask=mask_path, steps=5,
                               seed=3, num_images=2, timeout=T)
    as_base64 = client.generate(model="tiny", init_image=buf.getvalue(),
                                mask=mask_path.read_bytes(), steps=5, seed=3, num_images=2,
                                upload="base64", timeout=T)
    assert as_files.generation.request == as_base64.generation.request
    assert as_files.generation.request["mask"].startswith("sha256:")
    want = np.asarray(image)
    for png in as_files.images:
        out = pixels(png)
        assert np.array_equal(out[: SIZE // 2], want[: SIZE // 2])       # kept exactly
        assert not np.array_equal(out[SIZE // 2:], want[SIZE // 2:])     # generated
    assert as_files.images == as_base64.images


# -- a resumed stream --------------------------------------------------------------------


Cut = Callable[[bytes], "int | None"]


def _nth_line(buf: bytes, prefix: bytes, n: int) -> int | None:
    """Where the n-th body line starting with `prefix` begins (its preceding newline)."""
    pos = buf.find(b"\r\n\r\n")
    for _ in range(n):
        pos = buf.find(b"\n" + prefix, pos + 1)
        if pos < 0:
            return None
    return pos


def after_id_line(n: int) -> Cut:
    """Cut right after the n-th event's `id:` line, before the blank line that ends it: the
    client has seen the id of an event it must not count as received."""
    def cut(buf: bytes) -> int | None:
        pos = _nth_line(buf, b"id: ", n)
        if pos is None:
            return None
        end = buf.find(b"\n", pos + 1)
        return end + 1 if end > 0 else None
    return cut


def inside_data(n: int) -> Cut:
    """Cut 20 bytes into the n-th `data:` line of the response."""
    def cut(buf: bytes) -> int | None:
        pos = _nth_line(buf, b"data: ", n)
        return pos + 20 if pos is not None and pos + 20 <= len(buf) else None
    return cut


class CuttingProxy:
    """A TCP proxy to the API that cuts connection k's response where `cuts[k]` says
    (connections past the list pass untouched). Keeps each connection's request head as
    the client sent it; `forget_resume` strips its Last-Event-ID on the way, so the server
    replays the stream from the start (an intermediary that drops the header)."""

    def __init__(self, upstream_port: int, cuts: list[Cut | None],
                 forget_resume: bool = False) -> None:
        self.upstream_port, self.cuts, self.forget_resume = upstream_port, cuts, forget_resume
        self.requests: list[bytes] = []
        self.cut_count = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            k = len(self.requests)
            self.requests.append(head)
            if self.forget_resume:
                head = re.sub(rb"(?im)^last-event-id:[^\r\n]*\r\n", b"", head)
            up.sendall(head)
            cut = self.cuts[k] if k < len(self.cuts) else None
            buf, sent = b"", 0
            while data := up.recv(65536):
                buf += data
                at = cut(buf) if cut else None
                if at is not None:
                    conn.sendall(buf[sent:at])
                    self.cut_count += 1
                    return
                conn.sendall(data)
                sent = len(buf)
        except OSError:
            return
        finally:
            for s in (conn, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def last_event_id(self, k: int) -> str | None:
        m = re.search(rb"(?im)^last-event-id: *(\S+)\r$", self.requests[k])
        return m.group(1).decode() if m else None

    def close(self) -> None:
        self.sock.close()


async def async_events(url: str, job_id: str) -> list[dc.Event]:
    async with dc.AsyncClient(url, retry_backoff=0.05) as c:
        return [ev async for ev in c.events(job_id, timeout=T)]


@pytest.mark.parametrize("flavour", ["sync", "async", "replayed"])
def test_a_dropped_stream_resumes_without_gap_or_duplicate(client: dc.Client, stack: Stack,
                                                           flavour: str) -> None:
    """`replayed`: the resumed connections replay the stream from its start; the client
    still gives each event once."""
    job = client.submit(model="tiny", num_images=2, steps=10, snapshot_every=1, seed=4)
    port = int(stack.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, [after_id_line(3), inside_data(2)],
                         forget_resume=flavour == "replayed")
    try:
        if flavour != "async":
            with dc.Client(proxy.url, retry_backoff=0.05) as via_proxy:
                got = list(via_proxy.events(job.id, timeout=T))
        else:
            got = asyncio.run(async_events(proxy.url, job.id))
    finally:
        proxy.close()
    assert proxy.cut_count == 2 and len(proxy.requests) == 3     # two drops, two resumes
    truth = stream_entries(stack.redis, job.id)
    assert truth[-1][1] == "done" and len(truth) > 10
    assert [e.id for e in got] == [i for i, _, _ in truth]        # no gap, no duplicate
    assert [str(e.type) for e in got] == [t for _, t, _ in truth]
    assert [e.image for e in got if e.type == "snapshot"] == \
        [frame(f) for _, t, f in truth if t == "snapshot"]
    assert [e.data for e in got if e.type in ("started", "progress")] == \
        [json.loads(f["data"]) for _, t, f in truth if t in ("started", "progress")]
    # Each resume asked for what came after the last whole event it had.
    assert proxy.last_event_id(0) is None
    assert proxy.last_event_id(1) == got[1].id       # the 3rd event's id line was seen, not
    # its end; then 1 whole event and 1 partial (a replay: events 1 and 2 again, both seen).
    assert proxy.last_event_id(2) == got[1 if flavour == "replayed" else 2].id


def test_a_stream_that_keeps_dropping_gives_up(client: dc.Client, stack: Stack) -> None:
    job = client.submit(model="tiny", steps=3, seed=1)
    client.wait(job.id, timeout=T)
    port = int(stack.url.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, [inside_data(1)] * 10)
    try:
        with dc.Client(proxy.url, stream_retries=2, retry_backoff=0.01) as c, \
                pytest.raises(dc.StreamError, match="gave up after 2 retries"):
            list(c.events(job.id, timeout=T))
    finally:
        proxy.close()
    assert len(proxy.requests) == 3                  # the first try and 2 retries


# -- errors ------------------------------------------------------------------------------


def test_errors_are_typed_and_name_the_field(client: dc.Client, stack: Stack) -> None:
    for call in (lambda: client.get("nope"), lambda: client.cancel("nope"),
                 lambda: list(client.events("nope", timeout=T)), lambda: client.image("nope", 0)):
        with pytest.raises(dc.NotFoundError) as nf:
            call()
        assert nf.value.status == 404 and nf.value.code == "not_found"
    with pytest.raises(dc.InvalidRequestError) as bad:
        client.submit(model="tiny", steps=5000)
    assert bad.value.status == 422 and bad.value.field == "steps"
    assert "steps" in str(bad.value) and "422" in str(bad.value)
    with pytest.raises(dc.InvalidRequestError) as bad:
        client.submit(model="tiny", sampler="euler")
    assert bad.value.field == "sampler"
    with pytest.raises(dc.NotFoundError) as unknown:
        client.submit(model="nope", steps=3)
    assert unknown.value.field == "model" and "tiny" in unknown.value.message
    with pytest.raises(TypeError, match="init_image"):
        client.submit(model="tiny", init_image=3.5)
    with dc.Client(f"http://127.0.0.1:{free_port()}") as nobody, \
            pytest.raises(dc.NetworkError):
        nobody.models()

    # A server with keys: none or a wrong one is a 401; the key works; a rate limit is a
    # 429 with Retry-After.
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keyed = ApiProcess(stack.redis_url, stack.tmp / "api-keyed.log",
                       {"DDPM_API_KEYS": digest, "DDPM_RATE_LIMIT": "1",
                        "DDPM_RATE_WINDOW": "600"})
    try:
        for key in (None, "wrong"):
            with dc.Client(keyed.url, api_key=key) as c, \
                    pytest.raises(dc.AuthenticationError) as auth:
                c.models()
            assert auth.value.status == 401 and auth.value.code == "unauthorized"
        with dc.Client(keyed.url, api_key=KEY) as c:
            assert "tiny" in {m.name for m in c.models()}
            assert c.generate(model="tiny", steps=3, timeout=T).generation.succeeded
            with pytest.raises(dc.RateLimitError) as limited:
                c.submit(model="tiny", steps=3)
            assert limited.value.status == 429 and limited.value.retry_after
            assert limited.value.retry_after > 0
    finally:
        keyed.stop()


# -- ddpm generate -----------------------------------------------------------------------


def ddpm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_ddpm_generate(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = ddpm("generate", "--server", stack.url, "--model", "tinycond", "--class-label", "2",
               "--guidance-scale", "2", "--num-images", "2", "--steps", "6", "--seed", "9",
               "--out", str(out), "--stream", "--snapshot-every", "3")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png"]
    assert all(Image.open(p).size == (SIZE, SIZE) for p in out.glob("*.png"))
    assert sorted(p.name for p in (out / "frames").iterdir()) == [
        "0000-0003.png", "0001-0003.png"]                # step 6 is the final image
    doc = json.loads((out / "generation.json").read_text())
    assert doc["status"] == "succeeded" and doc["request"]["seed"] == 9
    assert f"wrote 2 images to {out}" in run.stdout
    assert "12/12" in run.stderr                         # the progress, from the events
    with dc.Client(stack.url) as c:
        assert (out / "0001.png").read_bytes() == c.image(doc["id"], 1)

    for args, words in ((("--steps", "5000"), ("422", "steps")),
                        (("--class-label", "3"), ("class_label", "unconditional")),
                        (("--init-image", str(tmp_path / "missing.png")), ("missing.png",))):
        bad = ddpm("generate", "--server", stack.url, "--model", "tiny", *args,
                   "--out", str(tmp_path / "bad"))
        assert bad.returncode == 2, bad.stderr
        line, = bad.stderr.strip().splitlines()          # one line, no traceback
        assert line.startswith("ddpm generate: ") and all(w in line for w in words), line
    down = ddpm("generate", "--server", f"http://127.0.0.1:{free_port()}", "--out",
                str(tmp_path / "bad"))
    assert down.returncode == 2 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    # Past --timeout the job is canceled (nobody will fetch its images), and that is an error.
    slow = ddpm("generate", "--server", stack.url, "--model", "tiny", "--steps", "1000",
                "--timeout", "0.3", "--out", str(tmp_path / "bad"))
    assert slow.returncode == 2, slow.stderr
    lines = slow.stderr.strip().splitlines()
    assert lines[-1].startswith("ddpm generate: ") and "timeout" in lines[-1]
    assert "Traceback" not in slow.stderr
    with dc.Client(stack.url) as c:
        assert c.get(lines[0].split(":")[0]).status == "canceled"
    assert not (tmp_path / "bad").exists()


# -- the README's examples ---------------------------------------------------------------


def readme_client_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The Python client", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_client_examples_run(stack: Stack, tmp_path: Path) -> None:
    """Both examples, as written but for the server's address and the model (the tiny
    conditional test model for the shipped `mnist`)."""
    blocks = readme_client_blocks()
    assert len(blocks) == 2 and "Client(" in blocks[0] and "AsyncClient(" in blocks[1]
    for block in blocks:
        code = block.replace("http://localhost:8000", stack.url).replace('"mnist"',
                                                                          '"tinycond"')
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "sevens").glob("*.png"))) == 4
    seven, three = (pixels(p.read_bytes()) for p in (tmp_path / "sevens" / "0000.png",
                                                     tmp_path / "three.png"))
    assert np.array_equal(three[: SIZE // 2], seven[: SIZE // 2])     # as the comment says
    assert sorted(p.name for p in tmp_path.glob("digit*.png")) == [
        f"digit{d}.png" for d in range(10)]
