"""Writes a job's events and images to Redis from one background thread.

PNG encoding and Redis round-trips happen here, off the step loop, so a burst of finished
images never stalls the GPU. One thread keeps each job's events in order; every call
returns a Future the loop checks before it reports a job as done.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image
from redis import Redis

from .contract import Event, EventType, events_key, image_key
from .engine import Frame


def encode_png(pixels: np.ndarray) -> bytes:
    """`[H x W x C]` uint8 (C = 1 or 3) → PNG bytes."""
    arr = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class EventWriter:
    """Appends to `ddpm:events:{job}` (a capped Stream) and stores `ddpm:image:{job}:{i}`."""

    def __init__(self, redis: Redis, *, ttl: int, maxlen: int) -> None:
        self.redis = redis
        self.ttl = ttl           # every key expires; refreshed while the job runs
        self.maxlen = maxlen
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddpm-events")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._pool.submit(fn, *args)

    def event(self, job_id: str, event: Event) -> Future[Any]:
        return self._pool.submit(self._xadd, job_id, event)

    def frame(self, frame: Frame, total_steps: int, kind: str) -> Future[Any]:
        """A snapshot goes into the stream; a final image is stored, then announced."""
        return self._pool.submit(self._frame, frame, total_steps, kind)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _xadd(self, job_id: str, event: Event) -> None:
        key = events_key(job_id)
        with self.redis.pipeline(transaction=False) as p:
            p.xadd(key, event.to_fields(), maxlen=self.maxlen, approximate=True)
            p.expire(key, self.ttl)
            p.execute()

    def _frame(self, frame: Frame, total_steps: int, kind: str) -> None:
        png = encode_png(frame.pixels.numpy())
        data = {"index": frame.index, "step": frame.step, "total_steps": total_steps}
        if frame.final:
            self.redis.set(image_key(frame.job_id, frame.index), png, ex=self.ttl)
            self._xadd(frame.job_id, Event(EventType.IMAGE, data))
        else:
            self._xadd(frame.job_id, Event(EventType.SNAPSHOT, {**data, "kind": kind}, png=png))

