"""The event stream's framing on the wire, against a real API process and a real Redis,
read off a raw socket (HTTP/1.1 chunks are the body messages the server sent): the events
of one read of the job's stream go out as one chunk, not one each, and an idle stream
carries keepalive comments. No worker runs: jobs stay queued, events are written here.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from test_lean_api import advertise

from app.sse import KEEPALIVE
from contract.events import Event, EventType
from contract.keys import events_key


def _post(c: httpx.Client) -> str:
    resp = c.post("/v1/generations", json={"model": "tiny", "steps": 2})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


class Chunks:
    """A GET whose chunked body is read chunk by chunk (`chunks`), on a thread."""

    def __init__(self, url: str, path: str) -> None:
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=60)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                          "Connection: close\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        self.status = self.file.readline().split()[1]
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert self.status == b"200", self.status
        assert headers.get("transfer-encoding") == "chunked", headers
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            size = int(self.file.readline().strip(), 16)
            data = self.file.read(size)
            self.file.readline()                      # the chunk's CRLF
            if size == 0:
                return
            self.chunks.append(data)

    def close(self) -> list[bytes]:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the stream did not end"
        self.sock.close()
        return self.chunks


def _events(chunk: bytes) -> list[str]:
    return [ln.split(b":", 1)[1].strip().decode() for ln in chunk.split(b"\n")
            if ln.startswith(b"event:")]


def test_the_events_of_one_read_go_out_as_one_chunk(start_api: Callable[..., Any],
                                                    r: redis.Redis) -> None:
    """A job whose last image, progress and `done` reach its stream in one write (as a
    worker writes them) is read in one XREAD and sent in one chunk: one socket write for
    the three, not three. Events written apart (here `started`, before the stream is
    opened, then the rest) still go out in order, each read its own chunk."""
    api = start_api({"DDPM_RATE_LIMIT": "0", "DDPM_STREAM_POLL_MS": "50"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=60) as c:
        job = _post(c)
    key = events_key(job)
    r.xadd(key, Event(EventType.STARTED, {"worker": "w"}).to_fields())
    stream = Chunks(api.url, f"/v1/generations/{job}/events")
    deadline = time.monotonic() + 30
    while not stream.chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [_events(c) for c in stream.chunks] == [["started"]]
    pipe = r.pipeline(transaction=True)
    for ev in (Event(EventType.IMAGE, {"index": 0, "step": 2, "steps_per_image": 2}),
               Event(EventType.PROGRESS, {"steps_done": 2, "total_steps": 2}),
               Event(EventType.DONE, {"num_images": 1})):
        pipe.xadd(key, ev.to_fields())
    pipe.execute()
    chunks = stream.close()
    assert [_events(c) for c in chunks] == [["started"], ["image", "progress", "done"]], chunks


def test_an_idle_stream_carries_keepalive_comments(start_api: Callable[..., Any],
                                                   r: redis.Redis) -> None:
    """A queued job's stream sends a comment (`: ping`, which clients ignore) once
    DDPM_SSE_KEEPALIVE_S has passed without a byte, so a proxy that closes quiet
    connections keeps it; its events still come, and it ends with the job."""
    api = start_api({"DDPM_RATE_LIMIT": "0", "DDPM_STREAM_POLL_MS": "50",
                     "DDPM_SSE_KEEPALIVE_S": "0.2"})
    advertise(r, "tiny")
    with httpx.Client(base_url=api.url, timeout=60) as c:
        job = _post(c)
        stream = Chunks(api.url, f"/v1/generations/{job}/events")
        deadline = time.monotonic() + 30
        while stream.chunks.count(KEEPALIVE) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.delete(f"/v1/generations/{job}").status_code == 200
    chunks = stream.close()
    pings = [c for c in chunks if c == KEEPALIVE]
    assert len(pings) >= 2, chunks
    assert _events(chunks[-1]) == ["canceled"], chunks
