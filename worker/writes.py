"""What the step loop hands the event writer, as typed writes, and the Redis commands one
flush of the writer turns them into.

A `Batch` holds one pass's writes in order: an event (`EventWrite`), a frame (`FrameWrite`:
a snapshot into the stream, a final image stored and announced) or a hash field of the
job's (`HashWrite`, RQ's `meta`). Each write queues its own commands on a `Flush`
(`Write.commands`); the flush adds what is shared by the writes of one script run:

- **One expiry per key family per job.** A job's stream (and its frames' ledger) gets its
  TTL when this writer first writes it, and again only when the TTL it set is older than
  `slack` (`KeyTtls`): a 1-image job costs one EXPIRE, not one per batch (the top command
  of a 1-image request: issue 25). A key so expires between `ttl − slack` and `ttl` after
  the job's last write. The writer's script being gone from Redis (a restart that lost the
  data, SCRIPT FLUSH) clears what `KeyTtls` remembers (events.py).
- **Hash writes merged.** Several writes of one hash field in one script run leave only
  the last value, and nothing reads between them (a script runs alone): one HSET per hash
  with the last value of each field, after the flush's other commands.
- **One index expiry.** Jobs whose frames are deleted `snapshot_ttl` after their end are
  scored in FRAMES_EXPIRING with one ZADD and one EXPIRE per flush.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from contract.events import TERMINAL_EVENTS, Event, EventType, FinalImage, Snapshot, TypedEvent
from contract.keys import events_key, image_key
from contract.preview import Preview

from .engine import Frame
from .frames import frame_command, schedule_expiry

EVENT_BYTES = 256            # what an event (not a frame) is counted as, pending
FINAL = Preview(size=0, format="png")      # final images: lossless, full size
TTL_SLACK_MAX = 60           # seconds: a key's TTL is refreshed once it is this old, at most
STREAM, FRAMES = "stream", "frames"        # key families of a job (FRAMES: ledger, counter)


def ttl_slack(ttl: int) -> int:
    """How much earlier than `ttl` after its last write a job's key may expire: a tenth
    of the TTL, at most TTL_SLACK_MAX s (0 for TTLs under 10 s: every write refreshes)."""
    return min(TTL_SLACK_MAX, ttl // 10)


class KeyTtls:
    """When this writer last set the TTL of each job's key families (writer thread only).
    An entry older than `slack` is due again, so dropping it changes nothing: `prune`
    keeps the table to the jobs written within the last `slack` seconds."""

    def __init__(self, slack: float) -> None:
        self.slack = slack
        self._set: dict[tuple[str, str], float] = {}
        self._pruned = 0.0

    def due(self, family: str, job_id: str, now: float) -> bool:
        t = self._set.get((family, job_id))
        return t is None or now - t >= self.slack

    def mark(self, keys: dict[tuple[str, str], float]) -> None:
        self._set.update(keys)

    def forget(self, job_ids: set[str]) -> None:
        """These jobs' writes ended here (a later run sets their TTLs afresh)."""
        for key in [k for k in self._set if k[1] in job_ids]:
            del self._set[key]

    def prune(self, now: float) -> None:
        if now - self._pruned < self.slack:
            return
        self._pruned = now
        self._set = {k: t for k, t in self._set.items() if now - t < self.slack}

    def clear(self) -> None:
        self._set.clear()

    def __len__(self) -> int:
        return len(self._set)


@dataclass(frozen=True)
class StreamLimits:
    """How the writer keeps a job's keys: TTLs, the stream's cap and snapshot budget."""

    ttl: int                      # every key expires; refreshed while the job runs
    maxlen: int                   # entries a stream keeps (approximately)
    stream_max_bytes: int         # bytes of snapshot frames a stream keeps
    snapshot_ttl: int             # an ended job's frames are deleted this much later


class Flush:
    """The commands of one writer script run: `pipe` is a WriteBatch group; `finish` adds
    the merged hash writes and the frame-expiry index, `marks` are the TTLs it sets (kept
    in `KeyTtls` once the run succeeded)."""

    def __init__(self, pipe: Any, limits: StreamLimits, ttls: KeyTtls, now: float,
                 framed: set[str]) -> None:
        self.pipe = pipe
        self.limits = limits
        self._ttls = ttls
        self._now = now
        self.marks: dict[tuple[str, str], float] = {}
        self.ended: set[str] = set()          # jobs whose last event here is in this run
        self.framed = framed                  # the writer's jobs with frames (all runs)
        self._hashes: dict[str, dict[str, bytes | str]] = {}
        self._expiring: list[str] = []

    def ttl_due(self, family: str, job_id: str) -> bool:
        """Whether this run sets the TTL of `family` of the job (and so records it)."""
        key = (family, job_id)
        if key in self.marks or not self._ttls.due(family, job_id, self._now):
            return False
        self.marks[key] = self._now
        return True

    def xadd(self, job_id: str, event: Event) -> None:
        key = events_key(job_id)
        self.pipe.xadd(key, event.to_fields(), maxlen=self.limits.maxlen, approximate=True)
        if self.ttl_due(STREAM, job_id):
            self.pipe.expire(key, self.limits.ttl)

    def hset(self, key: str, name: str, value: bytes | str) -> None:
        self._hashes.setdefault(key, {})[name] = value

    def expire_frames_later(self, job_id: str) -> None:
        self._expiring.append(job_id)

    def finish(self) -> None:
        for key, mapping in self._hashes.items():
            self.pipe.hset(key, mapping=mapping)
        if self._expiring:
            schedule_expiry(self.pipe, self._expiring, self.limits.snapshot_ttl)


class Write(Protocol):
    """One write of a batch: what it concerns, what it costs pending, its commands."""

    @property
    def job_id(self) -> str: ...

    @property
    def nbytes(self) -> int: ...

    def commands(self, flush: Flush) -> None: ...


@dataclass(eq=False)
class EventWrite:
    """An event appended to the job's stream; a job's last event here (terminal, or
    requeued) also ends its keys' TTL bookkeeping and schedules its frames' deletion."""

    job_id: str
    event: Event
    nbytes: int = EVENT_BYTES

    @property
    def terminal(self) -> bool:
        return self.event.type in TERMINAL_EVENTS

    @property
    def ends(self) -> bool:
        """The job's run here ends with it (terminal, or re-queued)."""
        return self.terminal or self.event.type == EventType.REQUEUED

    def commands(self, flush: Flush) -> None:
        flush.xadd(self.job_id, self.event)
        if not self.ends:
            return
        flush.ended.add(self.job_id)
        if not self.terminal:
            return
        lim = flush.limits
        if lim.snapshot_ttl < lim.ttl and self.job_id in flush.framed:   # else they go
            flush.expire_frames_later(self.job_id)                       # with the stream


@dataclass(eq=False)
class HashWrite:
    """A hash field of the job's (RQ's `meta`, say), written with its events (merged with
    other writes of the same field in one script run: the last value wins)."""

    job_id: str
    key: str
    name: str
    value: bytes | str
    nbytes: int = EVENT_BYTES

    def commands(self, flush: Flush) -> None:
        flush.hset(self.key, self.name, self.value)


@dataclass(eq=False)
class ValueWrite:
    """A plain value of the job's (its resume state), set with `ttl` after the writes
    before it in the batch (the frames of the steps it stands for); `value` None deletes
    the key."""

    job_id: str
    key: str
    value: bytes | None
    ttl: int
    nbytes: int = EVENT_BYTES

    def commands(self, flush: Flush) -> None:
        if self.value is None:
            flush.pipe.delete(self.key)
        else:
            flush.pipe.set(self.key, self.value, ex=self.ttl)


@dataclass(eq=False)
class FrameWrite:
    """A frame of one image: a snapshot goes into the stream (encoded as `preview` says,
    within the stream's byte budget); a final image is stored (always PNG), then
    announced, unless `announce` is off (its job's last step: the `image` event goes with
    the job's `done`, live.py)."""

    frame: Frame
    steps_per_image: int
    kind: str
    preview: Preview
    nbytes: int
    dropped: bool = False     # superseded before it was taken: not written
    skipped: int = 0          # frames of this image dropped just before this one
    encoded: bytes | None = None
    span: Any = None          # a final image's job span (tracing.py): encode, write under it
    pointer: bytes | None = None   # uploaded (results_store.py): Redis keeps its URL only
    announce: bool = True     # a final image's `image` event goes with this write

    @property
    def job_id(self) -> str:
        return self.frame.job_id

    @property
    def snapshot(self) -> bool:
        return not self.frame.final

    @property
    def encoding(self) -> Preview:
        return FINAL if self.frame.final else self.preview

    def event(self) -> TypedEvent:
        """The frame's event (its image, if a snapshot, encoded)."""
        f = self.frame
        if f.final:
            return FinalImage(index=f.index, step=f.step, steps_per_image=self.steps_per_image)
        assert self.encoded is not None
        return Snapshot(index=f.index, step=f.step, steps_per_image=self.steps_per_image,
                        kind=self.kind, format=self.preview.format,
                        size=int(f.pixels.shape[0]), dropped=self.skipped,
                        image=self.encoded)

    def commands(self, flush: Flush) -> None:
        if self.dropped:
            return
        f, lim = self.frame, flush.limits
        if f.final:
            value = self.encoded if self.pointer is None else self.pointer
            flush.pipe.set(image_key(f.job_id, f.index), value, ex=lim.ttl)
            if self.announce:
                flush.xadd(f.job_id, self.event().event)
            return
        frame_command(flush.pipe, f.job_id, self.event().to_fields(),
                      budget=lim.stream_max_bytes, maxlen=lim.maxlen,
                      ttl=lim.ttl if flush.ttl_due(FRAMES, f.job_id) else 0)
        flush.framed.add(f.job_id)
        if flush.ttl_due(STREAM, f.job_id):
            flush.pipe.expire(events_key(f.job_id), lim.ttl)


@dataclass(eq=False)
class InputWrite:
    """An input image the model saw (the PNG the API stored), to be uploaded to the
    result store (events.py does, with the job's final images); no Redis command of its
    own: the job's success replaces the stored PNG with the object's URL (live.py)."""

    job_id: str
    field: str
    png: bytes
    nbytes: int = EVENT_BYTES

    def commands(self, flush: Flush) -> None:
        return None


@dataclass
class Batch:
    """The writes of one pass of the loop, in the order they are to reach Redis."""

    ops: list[Write] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)
    seq: int = 0
    nbytes: int = 0           # counted against the writer's pending bytes

    def __bool__(self) -> bool:
        return bool(self.ops)

    def add(self, op: Write) -> None:
        self.ops.append(op)
        self.jobs.add(op.job_id)
        self.nbytes += op.nbytes

    def event(self, job_id: str, event: Event | TypedEvent) -> None:
        """An event of the job's (typed, or the generic `Event`)."""
        self.add(EventWrite(job_id, event.event))

    def frame(self, frame: Frame, steps_per_image: int | None = None, kind: str | None = None,
              preview: Preview | None = None, *, span: Any = None,
              announce: bool = True) -> FrameWrite:
        """A frame the engine made: labelled by its job's frame plan (`frame.plan`), or by
        the arguments given (a frame made outside an engine has no plan). `span`: the job's
        span, when traced (its final images' encode and write spans go under it);
        `announce`: off, a final image is stored without its event (FrameWrite)."""
        plan = frame.plan
        if plan is not None:
            steps_per_image = plan.steps_per_image if steps_per_image is None \
                else steps_per_image
            kind = kind or plan.kind
            preview = preview or plan.preview
        if steps_per_image is None or kind is None or preview is None:
            raise ValueError("a frame without a plan needs steps_per_image, kind and preview")
        op = FrameWrite(frame, steps_per_image, kind, preview, frame.pixels.numel(),
                        span=span, announce=announce)
        self.add(op)
        return op

    def hset(self, job_id: str, key: str, field_name: str, value: bytes | str) -> None:
        """A hash field of the job's (RQ's `meta`, say), written in order with its events."""
        self.add(HashWrite(job_id, key, field_name, value, EVENT_BYTES + len(value)))

    def value(self, job_id: str, key: str, value: bytes | None, ttl: int) -> None:
        """Set (None: delete) a value of the job's, after this batch's earlier writes."""
        self.add(ValueWrite(job_id, key, value, ttl, EVENT_BYTES + len(value or b"")))

    def input(self, job_id: str, field_name: str, png: bytes) -> None:
        """An input image of the job's, for the result store (InputWrite)."""
        self.add(InputWrite(job_id, field_name, png, EVENT_BYTES + len(png)))

    def snapshots(self) -> list[FrameWrite]:
        return [op for op in self.ops if isinstance(op, FrameWrite) and op.snapshot]

    def frames(self) -> list[FrameWrite]:
        return [op for op in self.ops if isinstance(op, FrameWrite)]
