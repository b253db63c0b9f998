"""`Client`: the blocking client (httpx.Client). Requests and parsing live in `_core`;
this module only moves bytes and sleeps between stream retries."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Self, TypeVar

import httpx

from . import _core
from .errors import NetworkError
from .types import Event, Frame, Generation, Model, Result, to_pil

T = TypeVar("T")


class Client:
    """ddpm-serve's native API, blocking.

    `Client("http://127.0.0.1:8000", api_key=None)`; use it as a context manager (or call
    `close()`) to release its connections. `timeout` bounds each plain request; event
    streams wait up to `stream_read_timeout` for the next byte (the server pings every 15 s)
    and resume after a drop up to `stream_retries` times in a row, backing off from
    `retry_backoff` seconds."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 stream_retries: int = 5, retry_backoff: float = 0.25,
                 stream_read_timeout: float = 60.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.stream_retries, self.retry_backoff = stream_retries, retry_backoff
        self.stream_read_timeout = stream_read_timeout
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout,
                                  headers=_core.headers(api_key, headers), transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -----------------------------------------------------------------------

    def _send(self, call: _core.Call) -> httpx.Response:
        try:
            return self._http.request(call.method, call.path, **call.kwargs())
        except httpx.TransportError as e:
            raise NetworkError(f"{call.method} {self.base_url}{call.path}: {e!r}") from e

    def _run(self, op: _core.Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(self._send(call))
        except StopIteration as stop:
            return stop.value

    # -- the API -------------------------------------------------------------------------

    def models(self) -> list[Model]:
        """The models live workers serve."""
        return self._run(_core.models_op())

    def model(self, name: str) -> Model:
        return self._run(_core.model_op(name))

    def submit(self, *, upload: _core.Upload = "multipart", idempotency_key: str | None = None,
               **fields: Any) -> Generation:
        """Queue a generation; returns at once (`202`) with the job, its seed drawn.

        `fields` are the native request's (`model`, `num_images`, `steps`, `sampler`,
        `seed`, `class_label`, `guidance_scale`, `snapshot_every`, `strength`…; None means
        the server's default). `init_image`, `mask`, `interpolate_to` take bytes, a path
        or a PIL image, sent as multipart file parts (or base64 in JSON with
        `upload="base64"`). The same `idempotency_key` and fields return the same job, so
        a submission can be retried safely."""
        return self._run(_core.submit_op(fields, upload, idempotency_key))

    def get(self, job_id: str) -> Generation:
        """The job's status, progress, timings and image links."""
        return self._run(_core.get_op(job_id))

    def cancel(self, job_id: str) -> Generation:
        """Cancel a queued or running job (ConflictError once it has ended)."""
        return self._run(_core.cancel_op(job_id))

    def image(self, job_id: str, index: int = 0) -> bytes:
        """Final image `index` as PNG bytes."""
        return self._run(_core.image_op(job_id, index))

    def image_pil(self, job_id: str, index: int = 0) -> Any:
        """Final image `index` as a PIL image (needs the `images` extra)."""
        return to_pil(self.image(job_id, index))

    def images(self, job_id: str) -> list[bytes]:
        """Every final image of the job as PNG bytes, in order."""
        return self._run(_core.images_op(job_id))

    def grid(self, job_id: str) -> bytes:
        """All final images tiled into one PNG."""
        return self._run(_core.bytes_op(_core.job_path(job_id, "grid.png")))

    def events(self, job_id: str, last_event_id: str | None = None, *,
               inline_images: bool = False, timeout: float | None = None
               ) -> Iterator[Event]:
        """The job's events, live, ending after the terminal one (`done`, `error`,
        `canceled`). A dropped connection is resumed with `Last-Event-ID`: no event is
        missed or repeated. Start after `last_event_id` to continue an earlier reading;
        `inline_images` puts each final PNG into its `image` event; WaitTimeout once
        `timeout` seconds pass before the end."""
        return self._follow(_core.Follower(
            job_id, last_event_id, inline_images=inline_images, retries=self.stream_retries,
            backoff=self.retry_backoff, read_timeout=self.stream_read_timeout,
            connect_timeout=self.timeout, deadline=_core.deadline_of(timeout)))

    def _follow(self, f: _core.Follower) -> Iterator[Event]:
        while not f.done:
            call, timeout = f.connect()
            try:
                with self._http.stream(call.method, call.path, timeout=timeout,
                                       **call.kwargs()) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        delay = f.refused(resp)
                    else:
                        for line in resp.iter_lines():
                            ev = f.line(line)
                            if ev is not None:
                                yield ev
                                if f.done:
                                    return
                        delay = f.dropped(None)      # ended before its terminal event
            except httpx.TransportError as e:         # refused, reset, cut, timed out
                delay = f.dropped(e)
            time.sleep(delay)

    def frames(self, job_id: str, last_event_id: str | None = None, *,
               timeout: float | None = None) -> Iterator[Frame]:
        """Snapshot frames as they are made (submit with `snapshot_every` > 0), until the
        job ends; `events()` tells how it ended."""
        for ev in self.events(job_id, last_event_id, timeout=timeout):
            frame = _core.frame_of(ev)
            if frame is not None:
                yield frame

    def wait(self, job_id: str, timeout: float | None = None) -> Generation:
        """Block until the job ends, following its events (no polling); returns it as
        `get` does, whatever its status. WaitTimeout after `timeout` seconds."""
        job = self.get(job_id)
        if not job.done:
            f = _core.Follower(job_id, retries=self.stream_retries, backoff=self.retry_backoff,
                               read_timeout=self.stream_read_timeout,
                               connect_timeout=self.timeout,
                               deadline=_core.deadline_of(timeout))
            for _ in self._follow(f):
                pass
            for _ in range(_core.SETTLE_TRIES):
                job = self.get(job_id)
                if job.done:
                    break
                time.sleep(_core.SETTLE_DELAY)
        return job

    def result(self, job_id: str) -> Result:
        """A finished job and its images (GenerationError if it failed or was canceled)."""
        return self._run(_core.result_op(self.get(job_id)))

    def generate(self, *, timeout: float | None = None, upload: _core.Upload = "multipart",
                 idempotency_key: str | None = None, **fields: Any) -> Result:
        """Submit, wait for the job, download its images: one call. Raises GenerationError
        if the job fails or is canceled."""
        job = self.submit(upload=upload, idempotency_key=idempotency_key, **fields)
        return self._run(_core.result_op(self.wait(job.id, timeout=timeout)))
