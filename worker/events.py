"""Writes the jobs' events, images and progress to Redis from one background thread.

The step loop never waits on Redis or on an image encoder for what a step produced: it
collects the step's writes (events, frames, progress metadata) in a `Batch` and hands the
whole batch over at once. The writer thread takes every batch that is waiting, encodes the
frames on a small thread pool (Pillow's encoders release the GIL; BENCHMARKS.md §9), and
sends everything as one command (redis_batch.py). Batches are written in order, so each
job's events keep their order. The writes are typed (writes.py), and each turns itself
into commands on the flush, which sets each job's key TTLs once, not per batch.

Memory between the step loop and Redis is bounded (`max_pending_bytes`): past half of it
the writer is behind, and a snapshot superseded by a newer one of the same image before it
was taken is dropped (latest wins; the newer one says how many were dropped; final images
and events are never dropped); past all of it `behind` is true and the loop stops stepping
until the writer catches up. While Redis refuses writes for want of memory (maxmemory), the
writer keeps the batches and retries them, and the loop, soon behind, waits with its jobs.

A job is reported done only once its writes are in Redis: every batch has a sequence
number, the loop remembers the last batch that carried a job's writes, and `flushed(seq)`
says whether the writer has got that far (`error(job)` whether one of them failed).

With a result store (`DDPM_RESULTS_URL`; `use_store`) a job's final images and inputs are
uploaded on their own threads and its writes held until they land (uploads.py): a job with
writes held is not `flushed`, and an upload failed for good is its `error`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from redis import Redis
from redis.exceptions import NoScriptError

from contract import tracing
from contract.events import Event, TypedEvent
from contract.redis_errors import redis_full
from contract.results_store import ResultStore

from . import redis_batch
from .frames import encode_frame
from .redis_batch import WriteBatch
from .uploads import Uploads
from .writes import (
    EVENT_BYTES,
    FINAL,
    Batch,
    EventWrite,
    Flush,
    FrameWrite,
    HashWrite,
    KeyTtls,
    StreamLimits,
    Write,
    ttl_slack,
)

__all__ = ["EVENT_BYTES", "FINAL", "Batch", "EventWrite", "EventWriter", "FrameWrite",
           "HashWrite", "default_encode_threads"]

log = logging.getLogger("ddpm.worker")

FULL_RETRY = (0.1, 2.0)      # seconds between retries while Redis is full: first, most
RELEASE = Batch()            # queued by a finished upload: the writer looks at held writes


def default_encode_threads() -> int:
    """Encoder threads: one per core, at most 4 (more gains nothing at a step's frames)."""
    return max(1, min(4, os.cpu_count() or 1))


class ScriptsLost(Exception):
    """Redis no longer had the writer's script: it restarted (its data likely gone) or its
    scripts were flushed. Nothing of the write ran; the TTLs remembered are stale."""


class EventWriter:
    """Appends to `ddpm:events:{job}` (a capped Stream, its snapshots held to
    `stream_max_bytes`) and stores `ddpm:image:{job}:{i}`."""

    def __init__(self, redis: Redis, *, ttl: int, maxlen: int,
                 stream_max_bytes: int = 8 * 2**20, snapshot_ttl: int = 3600,
                 max_pending_bytes: int = 64 * 2**20, encode_threads: int | None = None,
                 on_drop: Callable[[int], None] | None = None,
                 on_full: Callable[[], None] | None = None) -> None:
        self.redis = redis
        self.limits = StreamLimits(ttl=ttl, maxlen=maxlen, stream_max_bytes=stream_max_bytes,
                                   snapshot_ttl=snapshot_ttl)
        self.ttls = KeyTtls(ttl_slack(ttl))    # when each job's key TTLs were set (thread)
        self.max_pending_bytes = max_pending_bytes
        self.encode_threads = encode_threads or default_encode_threads()
        self._on_drop = on_drop
        self._on_full = on_full
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._written_cond = threading.Condition()
        self._sent = 0                         # sequence number of the last batch handed over
        self._written = 0                      # ... and of the last one the thread finished
        self._errors: dict[str, BaseException] = {}
        self._pending_bytes = 0                # sent, not yet written
        self._waiting: dict[tuple[str, int], FrameWrite] = {}   # newest untaken snapshots
        self._framed: set[str] = set()         # jobs with frames, whose ending expires them
        self._closing = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._sha = hashlib.sha1(redis_batch.SCRIPT.encode()).hexdigest()   # as EVALSHA's
        self._ran = False             # the script has run here: a NOSCRIPT now means a loss
        self.uploads: Uploads | None = None        # use_store: results in object storage

    def use_store(self, store: ResultStore | None) -> None:
        """Upload final images and inputs to `store` (None: keep them in Redis)."""
        self.uploads = None if store is None else Uploads(
            store, self._written_cond, lambda: self._queue.put(RELEASE))

    @property
    def store(self) -> ResultStore | None:
        return None if self.uploads is None else self.uploads.store

    # -- the loop's side ---------------------------------------------------------------

    def send(self, batch: Batch) -> int:
        """Hand `batch` to the writer thread; its sequence number (0: it was empty)."""
        if not batch:
            return 0
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="ddpm-events", daemon=True)
            self._thread.start()
        dropped = 0
        with self._written_cond:
            coalesce = self._pending_bytes + batch.nbytes > self.max_pending_bytes // 2
            for op in batch.snapshots():
                key = (op.frame.job_id, op.frame.index)
                older = self._waiting.get(key)
                if coalesce and older is not None and not older.dropped:
                    older.dropped = True       # its batch, not yet taken, skips it
                    self._pending_bytes -= older.nbytes
                    op.skipped = older.skipped + 1
                    dropped += 1
                self._waiting[key] = op
            self._pending_bytes += batch.nbytes
            self._sent += 1
            batch.seq = self._sent
        self._queue.put(batch)
        if dropped and self._on_drop is not None:
            self._on_drop(dropped)
        return batch.seq

    def event(self, job_id: str, event: Event | TypedEvent) -> int:
        """One event on its own (a job ending outside a step)."""
        b = Batch()
        b.event(job_id, event)
        return self.send(b)

    @property
    def pending_bytes(self) -> int:
        """Bytes of pixels and events sent to the writer and not yet in Redis."""
        return self._pending_bytes

    @property
    def behind(self) -> bool:
        """Whether the loop should wait for the writer before it makes more frames."""
        return self._pending_bytes > self.max_pending_bytes

    def flushed(self, seq: int, job_id: str | None = None) -> bool:
        """Whether every batch up to `seq` has been written (or has failed): of the job's
        writes, with `job_id`; else of every job's (none held for an upload)."""
        with self._written_cond:
            return self._done(seq, job_id)

    def _done(self, seq: int, job_id: str | None = None) -> bool:
        return self._written >= seq and (self.uploads is None
                                         or self.uploads.clean(seq, job_id))

    def wait(self, seq: int, timeout: float) -> bool:
        """Wait up to `timeout` s for every batch up to `seq` to be written."""
        with self._written_cond:
            return self._written_cond.wait_for(lambda: self._done(seq), timeout)

    def wait_until_caught_up(self, timeout: float) -> bool:
        """Wait up to `timeout` s for `behind` to clear."""
        with self._written_cond:
            return self._written_cond.wait_for(lambda: not self.behind, timeout)

    def error(self, job_id: str) -> BaseException | None:
        """The first error met writing this job's batches since the last call, if any."""
        with self._written_cond:
            return self._errors.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        with self._written_cond:
            self._errors.pop(job_id, None)

    def close(self) -> None:
        """Write what is queued, then stop the thread (a later `send` starts another); while
        Redis is full, what it refuses is given up (its jobs come back through RQ)."""
        if self._thread is not None:
            self._closing = True
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

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
            batches = [b for b in batches if b is not RELEASE]
            if batches:
                self._take(batches)
                self._write(batches)
            if stop and self.uploads is not None:      # closing: let the uploads end
                self.uploads.close()
            self._release()
            if stop:
                return

    def _take(self, batches: list[Batch]) -> None:
        """From here on these batches' snapshots are written: no newer one can drop them."""
        with self._written_cond:
            for batch in batches:
                for op in batch.snapshots():
                    key = (op.frame.job_id, op.frame.index)
                    if self._waiting.get(key) is op:
                        del self._waiting[key]

    def _encode(self, ops: list[Write]) -> None:
        """Encode the frames not encoded yet. PNG and WebP go to the pool, a contiguous share
        per thread (1.9x on 2 cores; one task per frame lost to the hand-off for small ones,
        0.68x); JPEG here (Pillow's encoder does not run in parallel; BENCHMARKS.md §8)."""
        todo = [op for op in ops if isinstance(op, FrameWrite)
                and not op.dropped and op.encoded is None]
        here = [op for op in todo if op.encoding.format == "jpeg"]
        pooled = [op for op in todo if op.encoding.format != "jpeg"]
        n = min(self.encode_threads, len(pooled))
        shares = [pooled[k * len(pooled) // n:(k + 1) * len(pooled) // n] for k in range(n)]
        if n > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="ddpm-encode")
        pending = [self._pool.submit(_encode_all, share) for share in shares[1:]] \
            if n > 1 and self._pool is not None else []
        _encode_all(here)
        if shares:
            _encode_all(shares[0])        # this thread's share
        for future in pending:
            future.result()

    def _write(self, batches: list[Batch]) -> None:
        ops = [op for b in batches for op in b.ops]
        if self.uploads is not None:
            try:
                self._encode(ops)
            except Exception:      # met again, and reported, in _flush
                pass
            else:
                ops = self.uploads.hold(ops, batches[0].seq)
        self._flush(ops)
        with self._written_cond:
            self._written = batches[-1].seq
            self._written_cond.notify_all()

    def _release(self) -> None:
        """Write the held writes of every job whose uploads have all ended."""
        if self.uploads is None:
            return
        jobs, ops = self.uploads.ready()
        if not jobs:
            return
        self._flush(ops)
        with self._written_cond:
            self.uploads.settle(jobs, self._errors)
            self._written_cond.notify_all()

    # -- Redis ---------------------------------------------------------------------------

    def _flush(self, ops: list[Write]) -> None:
        """Write `ops` to Redis in one script run (retried while Redis is full)."""
        if not ops:
            return
        delay = FULL_RETRY[0]
        flush: Flush | None = None
        lost = 0
        jobs = {op.job_id for op in ops}
        while True:
            try:
                self._encode(ops)
                writes = WriteBatch(self.redis)
                flush = Flush(writes.group(), self.limits, self.ttls, time.monotonic(),
                              self._framed)
                for op in ops:
                    op.commands(flush)
                flush.finish()
                with ExitStack() as spans:      # traced jobs' results: a `write` span each
                    traced = _results(ops) if tracing.enabled() else {}
                    for job_id, (span, n) in traced.items():
                        spans.enter_context(tracing.child(
                            "write", span, {"ddpm.job_id": job_id, "ddpm.images": n}))
                    writes.run(self._run_script)
            except Exception as e:     # Redis down, full or restarted, or a bug
                if isinstance(e, ScriptsLost) and lost < 2:
                    log.warning("Redis lost the writer's script (restarted?): setting every "
                                "job's TTLs again")
                    self.ttls.clear()
                    lost += 1
                    continue
                if redis_full(e) and not self._closing:
                    # Nothing of the script ran: keep these writes and try again; the loop,
                    # soon behind, waits with its jobs.
                    if delay == FULL_RETRY[0]:
                        log.warning("Redis is full (maxmemory): holding the writes of %d "
                                    "jobs until it has room", len(jobs))
                    if self._on_full is not None:
                        self._on_full()
                    time.sleep(delay)
                    delay = min(FULL_RETRY[1], delay * 2)
                    continue
                log.error("writing events failed: %s", e)   # the jobs concerned fail or retry
                with self._written_cond:
                    for job_id in jobs:
                        self._errors.setdefault(job_id, e)
                flush = None
            else:
                if delay != FULL_RETRY[0]:
                    log.warning("Redis has room again: writes resumed")
            break
        if flush is not None:                   # written: its TTLs are set
            self.ttls.mark(flush.marks)
            self.ttls.forget(flush.ended)
            self.ttls.prune(time.monotonic())
        ended = [op for op in ops if isinstance(op, EventWrite) and op.ends]
        self._framed -= {op.job_id for op in ended if op.terminal}
        with self._written_cond:
            if self.uploads is not None:        # a later run here uploads afresh
                self.uploads.ended({op.job_id for op in ended})
            self._pending_bytes -= sum(op.nbytes for op in ops if not (
                isinstance(op, FrameWrite) and op.snapshot and op.dropped))
            self._written_cond.notify_all()

    def _run_script(self, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA of the batch script (WriteBatch.run's `script`). A Redis that never had
        it (this writer's first write) gets it loaded and the write sent again; one that
        lost it after it ran here (restarted, flushed): ScriptsLost, after loading it."""
        try:
            out = redis_batch.evalsha(self.redis, self._sha, keys, args)
        except NoScriptError:
            self._sha = self.redis.script_load(redis_batch.SCRIPT)
            if self._ran:
                raise ScriptsLost() from None
            out = redis_batch.evalsha(self.redis, self._sha, keys, args)
        self._ran = True
        return out


def _encode_all(ops: list[FrameWrite]) -> None:
    """Encode each frame: a final image as lossless PNG, a snapshot as its preview says; a
    traced final image in an `encode` span under its job's (this is another thread: the
    job's span is passed, not current)."""
    for op in ops:
        if op.span is None:
            op.encoded = encode_frame(op.frame.pixels.numpy(), op.encoding)
            continue
        with tracing.child("encode", op.span, {"ddpm.job_id": op.job_id,
                                               "ddpm.image": op.frame.index}):
            op.encoded = encode_frame(op.frame.pixels.numpy(), op.encoding)


def _results(ops: list[Write]) -> dict[str, tuple[Any, int]]:
    """The traced jobs whose final images these writes store: job → (its span, images)."""
    out: dict[str, tuple[Any, int]] = {}
    for op in ops:
        if isinstance(op, FrameWrite) and op.span is not None and not op.dropped:
            out[op.job_id] = (op.span, out.get(op.job_id, (None, 0))[1] + 1)
    return out
