"""Writes the jobs' events, images and progress to Redis from one background thread.

The step loop never waits on Redis or on a PNG encoder for what a step produced: it
collects the step's writes (events, frames, progress metadata) in a `Batch` and hands the
whole batch over at once. The writer thread takes every batch that is waiting, encodes the
frames (Pillow releases the GIL while it compresses), and sends everything as one command
(redis_batch.py), refreshing each touched stream's TTL once. Batches are written in order, so
each job's events keep their order.

A job is reported done only once its writes are in Redis: every batch has a sequence
number, the loop remembers the last batch that carried a job's writes, and `flushed(seq)`
says whether the writer has got that far (`error(job)` whether one of them failed).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis import Redis

from models import png_bytes

from . import redis_batch
from .contract import Event, EventType, events_key, image_key
from .engine import Frame
from .redis_batch import WriteBatch

log = logging.getLogger("ddpm.worker")


def encode_png(pixels: np.ndarray) -> bytes:
    """`[H x W x C]` uint8 (C = 1 or 3) → PNG bytes, compressed fast (frames are many)."""
    return png_bytes(pixels, compress_level=1)


@dataclass
class _FrameWrite:
    frame: Frame
    total_steps: int
    kind: str


@dataclass
class Batch:
    """The writes of one pass of the loop, in the order they are to reach Redis."""

    ops: list[tuple[str, Any]] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)
    seq: int = 0

    def __bool__(self) -> bool:
        return bool(self.ops)

    def event(self, job_id: str, event: Event) -> None:
        self.ops.append(("event", (job_id, event)))
        self.jobs.add(job_id)

    def frame(self, frame: Frame, total_steps: int, kind: str) -> None:
        """A snapshot goes into the stream; a final image is stored, then announced."""
        self.ops.append(("frame", _FrameWrite(frame, total_steps, kind)))
        self.jobs.add(frame.job_id)

    def hset(self, job_id: str, key: str, field_name: str, value: bytes | str) -> None:
        """A hash field of the job's (RQ's `meta`, say), written in order with its events."""
        self.ops.append(("hset", (key, field_name, value)))
        self.jobs.add(job_id)


class EventWriter:
    """Appends to `ddpm:events:{job}` (a capped Stream) and stores `ddpm:image:{job}:{i}`."""

    def __init__(self, redis: Redis, *, ttl: int, maxlen: int) -> None:
        self.redis = redis
        self.ttl = ttl           # every key expires; refreshed while the job runs
        self.maxlen = maxlen
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._written_cond = threading.Condition()
        self._sent = 0                         # sequence number of the last batch handed over
        self._written = 0                      # ... and of the last one the thread finished
        self._errors: dict[str, BaseException] = {}
        self._thread: threading.Thread | None = None
        self._run_script = redis.register_script(redis_batch.SCRIPT)

    def send(self, batch: Batch) -> int:
        """Hand `batch` to the writer thread; its sequence number (0: it was empty)."""
        if not batch:
            return 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ddpm-events", daemon=True)
            self._thread.start()
        self._sent += 1
        batch.seq = self._sent
        self._queue.put(batch)
        return batch.seq

    def event(self, job_id: str, event: Event) -> int:
        """One event on its own (a job ending outside a step)."""
        b = Batch()
        b.event(job_id, event)
        return self.send(b)

    def flushed(self, seq: int) -> bool:
        """Whether every batch up to `seq` has been written (or has failed)."""
        with self._written_cond:
            return self._written >= seq

    def wait(self, seq: int, timeout: float) -> bool:
        """Wait up to `timeout` s for every batch up to `seq` to be written."""
        with self._written_cond:
            return self._written_cond.wait_for(lambda: self._written >= seq, timeout)

    def error(self, job_id: str) -> BaseException | None:
        """The first error met writing this job's batches since the last call, if any."""
        with self._written_cond:
            return self._errors.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        with self._written_cond:
            self._errors.pop(job_id, None)

    def close(self) -> None:
        """Write what is queued, then stop the thread (a later `send` starts another)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            batches: list[Batch] = []
            stop = batch is None
            if batch is not None:
                batches.append(batch)
            while not stop:                     # everything else already waiting
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    batches.append(more)
            if batches:
                self._write(batches)
            if stop:
                return

    def _write(self, batches: list[Batch]) -> None:
        try:
            writes = WriteBatch(self.redis)
            p = writes.group()
            streams: set[str] = set()
            for batch in batches:
                for kind, op in batch.ops:
                    self._queue_op(p, kind, op, streams)
            for key in streams:
                p.expire(key, self.ttl)
            writes.run(self._run_script)
        except Exception as e:     # Redis down, or a bug: the jobs concerned fail or retry
            log.error("writing events failed: %s", e)
            with self._written_cond:
                for batch in batches:
                    for job_id in batch.jobs:
                        self._errors.setdefault(job_id, e)
        with self._written_cond:
            self._written = batches[-1].seq
            self._written_cond.notify_all()

    def _queue_op(self, p: Any, kind: str, op: Any, streams: set[str]) -> None:
        if kind == "event":
            job_id, event = op
            self._xadd(p, job_id, event, streams)
        elif kind == "frame":
            fw: _FrameWrite = op
            f = fw.frame
            png = encode_png(f.pixels.numpy())
            data = {"index": f.index, "step": f.step, "total_steps": fw.total_steps}
            if f.final:
                p.set(image_key(f.job_id, f.index), png, ex=self.ttl)
                self._xadd(p, f.job_id, Event(EventType.IMAGE, data), streams)
            else:
                self._xadd(p, f.job_id, Event(EventType.SNAPSHOT, {**data, "kind": fw.kind},
                                              png=png), streams)
        else:
            key, name, value = op
            p.hset(key, name, value)

    def _xadd(self, p: Any, job_id: str, event: Event, streams: set[str]) -> None:
        key = events_key(job_id)
        p.xadd(key, event.to_fields(), maxlen=self.maxlen, approximate=True)
        streams.add(key)
