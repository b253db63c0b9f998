"""`AsyncClient`: the asyncio client (httpx.AsyncClient), method for method the same as
`Client`; requests and parsing live in `_core`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Self, TypeVar

import httpx

from . import _core
from .errors import NetworkError
from .types import Event, Frame, Generation, Model, Result, to_pil

T = TypeVar("T")


class AsyncClient:
    """ddpm-serve's native API for asyncio: `async with AsyncClient(url) as c: await
    c.generate(...)`. Arguments and behaviour as `Client`'s."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 stream_retries: int = 5, retry_backoff: float = 0.25,
                 stream_read_timeout: float = 60.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.stream_retries, self.retry_backoff = stream_retries, retry_backoff
        self.stream_read_timeout = stream_read_timeout
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                       headers=_core.headers(api_key, headers),
                                       transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _core.Call) -> httpx.Response:
        try:
            return await self._http.request(call.method, call.path, **call.kwargs())
        except httpx.TransportError as e:
            raise NetworkError(f"{call.method} {self.base_url}{call.path}: {e!r}") from e

    async def _run(self, op: _core.Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(await self._send(call))
        except StopIteration as stop:
            return stop.value

    async def models(self) -> list[Model]:
        return await self._run(_core.models_op())

    async def model(self, name: str) -> Model:
        return await self._run(_core.model_op(name))

    async def submit(self, *, upload: _core.Upload = "multipart",
                     idempotency_key: str | None = None, **fields: Any) -> Generation:
        """As `Client.submit`."""
        return await self._run(_core.submit_op(fields, upload, idempotency_key))

    async def get(self, job_id: str) -> Generation:
        return await self._run(_core.get_op(job_id))

    async def cancel(self, job_id: str) -> Generation:
        return await self._run(_core.cancel_op(job_id))

    async def image(self, job_id: str, index: int = 0) -> bytes:
        return await self._run(_core.image_op(job_id, index))

    async def image_pil(self, job_id: str, index: int = 0) -> Any:
        return to_pil(await self.image(job_id, index))

    async def images(self, job_id: str) -> list[bytes]:
        return await self._run(_core.images_op(job_id))

    async def grid(self, job_id: str) -> bytes:
        return await self._run(_core.bytes_op(_core.job_path(job_id, "grid.png")))

    def events(self, job_id: str, last_event_id: str | None = None, *,
               inline_images: bool = False, timeout: float | None = None
               ) -> AsyncIterator[Event]:
        """As `Client.events`: `async for ev in c.events(job_id)`."""
        return self._follow(_core.Follower(
            job_id, last_event_id, inline_images=inline_images, retries=self.stream_retries,
            backoff=self.retry_backoff, read_timeout=self.stream_read_timeout,
            connect_timeout=self.timeout, deadline=_core.deadline_of(timeout)))

    async def _follow(self, f: _core.Follower) -> AsyncIterator[Event]:
        while not f.done:
            call, timeout = f.connect()
            try:
                async with self._http.stream(call.method, call.path, timeout=timeout,
                                             **call.kwargs()) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        delay = f.refused(resp)
                    else:
                        async for line in resp.aiter_lines():
                            ev = f.line(line)
                            if ev is not None:
                                yield ev
                                if f.done:
                                    return
                        delay = f.dropped(None)
            except httpx.TransportError as e:
                delay = f.dropped(e)
            await asyncio.sleep(delay)

    async def frames(self, job_id: str, last_event_id: str | None = None, *,
                     timeout: float | None = None) -> AsyncIterator[Frame]:
        """As `Client.frames`."""
        async for ev in self.events(job_id, last_event_id, timeout=timeout):
            frame = _core.frame_of(ev)
            if frame is not None:
                yield frame

    async def wait(self, job_id: str, timeout: float | None = None) -> Generation:
        """As `Client.wait`."""
        job = await self.get(job_id)
        if not job.done:
            f = _core.Follower(job_id, retries=self.stream_retries, backoff=self.retry_backoff,
                               read_timeout=self.stream_read_timeout,
                               connect_timeout=self.timeout,
                               deadline=_core.deadline_of(timeout))
            async for _ in self._follow(f):
                pass
            for _ in range(_core.SETTLE_TRIES):
                job = await self.get(job_id)
                if job.done:
                    break
                await asyncio.sleep(_core.SETTLE_DELAY)
        return job

    async def result(self, job_id: str) -> Result:
        return await self._run(_core.result_op(await self.get(job_id)))

    async def generate(self, *, timeout: float | None = None,
                       upload: _core.Upload = "multipart", idempotency_key: str | None = None,
                       **fields: Any) -> Result:
        """As `Client.generate`."""
        job = await self.submit(upload=upload, idempotency_key=idempotency_key, **fields)
        return await self._run(_core.result_op(await self.wait(job.id, timeout=timeout)))
