"""The event writer's uploads to the result store, and the writes that wait for them.

With `DDPM_RESULTS_URL` (contract/results_store.py) a job's final images and inputs go to
object storage. An upload runs on its own thread (`UPLOAD_THREADS`: network-bound), retried
for the store's bounded time, so the writer thread never waits on the store: the writes of
a job with uploads under way are *held* here, in order, and written once they have all
ended (its `image` event, and the key holding the object's URL, after the upload; a
progress event that came after them after them too), while other jobs' writes go on. Held
writes stay counted in the writer's pending bytes: a store slower than the loop stops the
loop through the writer's usual back-pressure, nothing else does.

An upload that fails for good drops its image (never announced) and becomes the job's
error, so the loop fails the job ("result store unavailable: …") instead of succeeding it
without its images; later uploads of the job are skipped until its run here ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from contract.results_store import ResultStore, image_object, input_object

from .writes import FrameWrite, InputWrite, Write

log = logging.getLogger("ddpm.worker")

UPLOAD_THREADS = 8           # uploads to the result store at once


class Uploads:
    """Uploads under way and the writes held behind them, per job. `lock` is the writer's
    (its condition: `flushed` reads what is held here); `wake` tells the writer thread an
    upload has ended."""

    def __init__(self, store: ResultStore, lock: threading.Condition,
                 wake: Callable[[], None]) -> None:
        self.store = store
        self._lock = lock
        self._wake = wake
        self._pool: ThreadPoolExecutor | None = None
        self._held: dict[str, list[Write]] = {}      # job → writes waiting on its uploads
        self._held_from: dict[str, int] = {}         # job → the first batch it has held
        self._uploading: dict[str, int] = {}         # job → uploads not ended
        self._failed: dict[str, BaseException] = {}  # job → its first upload error

    def clean(self, seq: int, job_id: str | None) -> bool:
        """Nothing held of the job (with `job_id`), or of any batch up to `seq`."""
        if job_id is not None:
            return job_id not in self._held
        return all(first > seq for first in self._held_from.values())

    def hold(self, ops: list[Write], seq: int) -> list[Write]:
        """Start the uploads among `ops` (their frames encoded; `seq`: their first batch);
        hold the writes of jobs with uploads under way. Returns what may be written now."""
        now: list[Write] = []
        for op in ops:
            job_id = op.job_id
            upload = _upload_of(op)
            if upload is not None and job_id in self._failed:
                if isinstance(op, FrameWrite):
                    op.dropped = True                # never announced: the job fails
                upload = None
            if upload is not None:
                self._start(job_id, *upload, op)
            if upload is not None or job_id in self._held:
                with self._lock:
                    self._held.setdefault(job_id, []).append(op)
                    self._held_from.setdefault(job_id, seq)
            else:
                now.append(op)
        return now

    def ready(self) -> tuple[list[str], list[Write]]:
        """Jobs whose uploads have all ended, and their held writes, in order."""
        with self._lock:
            jobs = [j for j in self._held if not self._uploading.get(j)]
            return jobs, [op for j in jobs for op in self._held[j]]

    def settle(self, jobs: list[str], errors: dict[str, BaseException]) -> None:
        """`jobs`' held writes are written: no longer held; a failed upload becomes the
        job's error (in the writer's `errors`). Call with the lock held."""
        for j in jobs:
            self._uploading.pop(j, None)
            if j in self._failed:
                errors.setdefault(j, self._failed[j])
            del self._held[j]
            self._held_from.pop(j, None)

    def ended(self, job_ids: set[str]) -> None:
        """These jobs' runs here ended (a later run uploads afresh). Lock held."""
        for j in job_ids:
            self._failed.pop(j, None)

    def close(self) -> None:
        """Wait for the uploads under way (their writes are held until `ready`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _start(self, job_id: str, name: str, data: bytes, op: Write) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="ddpm-upload")
        with self._lock:
            self._uploading[job_id] = self._uploading.get(job_id, 0) + 1
        self._pool.submit(self._put, job_id, name, data, op)

    def _put(self, job_id: str, name: str, data: bytes, op: Write) -> None:
        """One upload (an upload thread), retried for the store's bounded time."""
        try:
            self.store.put(name, data)
            if isinstance(op, FrameWrite):
                op.pointer = self.store.pointer(name)
        except Exception as e:
            log.error("job %s: uploading %s failed: %s", job_id, name, e)
            if isinstance(op, FrameWrite):
                op.dropped = True
            with self._lock:
                self._failed.setdefault(job_id, e)
        finally:
            with self._lock:
                self._uploading[job_id] -= 1
            self._wake()


def _upload_of(op: Write) -> tuple[str, bytes] | None:
    """What a write puts in the result store (object name, bytes): a final image, an
    input; None for the rest."""
    if isinstance(op, FrameWrite) and op.frame.final and not op.dropped:
        assert op.encoded is not None
        return image_object(op.job_id, op.frame.index), op.encoded
    if isinstance(op, InputWrite):
        return input_object(op.job_id, op.field), op.png
    return None
