"""What a worker tells the work signal (contract/work.py): the image-steps it still has to
compute, what it clears per second (measured here, never configured), its models' load
times and readiness; and an advertisement soon after it takes jobs.

**The rate.** Image-steps done per second of busy wall time: the time from one engine step
to the next while the engine had work (admission, frames, writes and the forward, all of
it: what a worker really sustains), shared between models by their forward times. An idle
gap (the engine had nothing after a step) never counts.

**Occupancy.** A worker running 4 images clears fewer image-steps per second than it would
with a full batch: a step's time grows far slower than its rows (on a GPU it is nearly
flat until the device is full). A rate measured at low load would make the scaler see
more worker-seconds of work than there are and add workers that a single busy one could
absorb. So steps are kept apart by how full they were (buckets of 1, 2–3, 4–7, … slots),
each bucket's image-steps and seconds smoothed (exponential decay over about 50 steps),
and the rate reported is that of the fullest bucket with at least `MIN_STEPS` steps: the
capacity of the worker as far as it has been seen, a lower bound until it has been full
once, exact from then on. (Extra workers only help when there are enough images to fill
them, which is exactly when the fullest bucket is reached.)

A step gap over `PAUSE_FACTOR` times its bucket's mean is a pause (Redis away, the writer
far behind), not work, and is left out.

**Advertising soon.** A job taken leaves its queue at once, but the worker's advertisement
is renewed every heartbeat (5 s): for that long the job would be in no count at all. After
a step that follows new admissions the worker advertises again, at most every
`READVERTISE_GAP` seconds (one MULTI of three commands, ~0.1 ms; a worker taking jobs at
every step pays it at most 4 times a second).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

from redis import Redis
from redis.exceptions import RedisError

from contract.work import WorkerModelWork, store_rates, worker_model_work

from .engine import Engine, StepReport

log = logging.getLogger("ddpm.worker")

DECAY = 0.98              # per step: a bucket remembers about 1 / (1 − DECAY) = 50 steps
MIN_STEPS = 5             # a bucket's steps before its rate is reported
PAUSE_FACTOR = 20.0       # a gap this many times the bucket's mean step is a pause
READVERTISE_GAP = 0.25    # s: the soonest advertisement after another taken job
STORE_EVERY = 10.0        # s: the measured rates written to Redis (keys.THROUGHPUT), and
                          # as soon as a model's first rate is known


class _Buckets:
    """One model's steps by occupancy: per bucket (slots.bit_length()), decayed sums of
    image-steps, seconds and steps, and the steps counted."""

    def __init__(self) -> None:
        self.sums: dict[int, list[float]] = {}

    def add(self, slots: int, seconds: float) -> None:
        b = self.sums.setdefault(slots.bit_length(), [0.0, 0.0, 0.0, 0])
        if b[3] >= MIN_STEPS and seconds > PAUSE_FACTOR * b[1] / b[2]:
            return
        b[0] = b[0] * DECAY + slots
        b[1] = b[1] * DECAY + seconds
        b[2] = b[2] * DECAY + 1.0
        b[3] += 1

    def rate(self) -> float | None:
        """Image-steps per second of the fullest bucket measured enough."""
        for key in sorted(self.sums, reverse=True):
            image_steps, seconds, _, steps = self.sums[key]
            if steps >= MIN_STEPS and seconds > 0:
                return image_steps / seconds
        return None


class WorkMeter:
    """Fed by the loop after each engine step; read by the advertisement (any thread)."""

    def __init__(self, engine: Engine, redis: Redis, readvertise: Callable[[], None]) -> None:
        self.engine = engine
        self.redis = redis
        self._readvertise = readvertise
        self._lock = threading.Lock()               # the buckets vs. the heartbeat thread
        self._models: dict[str, _Buckets] = {}
        self._last: float | None = None             # when the last step ended
        self._busy = False                          # the engine had work after it
        self._known: set[str] = set()               # jobs in the engine after the last step
        self._pending = False                       # jobs taken since the last advertisement
        self._advertised = -float("inf")
        self._stored = time.monotonic()             # rates last written to Redis
        self._rated: set[str] = set()               # models whose rate was written then
        self.readvertised = 0                       # advertisements made here (a count)

    def stepped(self, report: StepReport) -> None:
        """After an engine step (the loop thread)."""
        now = time.monotonic()
        last, self._last = self._last, now
        busy, self._busy = self._busy, self.engine.busy
        if last is not None and busy and report.slots:
            total = sum(report.forward_seconds.values())
            with self._lock:
                for model, slots in report.slots.items():
                    share = report.forward_seconds.get(model, 0.0) / total if total > 0 \
                        else 1 / len(report.slots)
                    self._models.setdefault(model, _Buckets()).add(slots, (now - last) * share)
        jobs = set(self.engine.jobs)
        if not jobs <= self._known:
            self._pending = True
        self._known = jobs
        if self._pending and now - self._advertised >= READVERTISE_GAP:
            self._pending = False
            self._advertised = now
            self.readvertised += 1
            with contextlib.suppress(RedisError):   # the heartbeat advertises anyway
                self._readvertise()
        if now - self._stored >= STORE_EVERY or any(
                m not in self._rated and self.rate(m) is not None for m in report.slots):
            self._stored = now
            self.store()

    def rate(self, model: str) -> float | None:
        """Image-steps per second one worker like this clears for `model` (None: not yet
        measured)."""
        with self._lock:
            buckets = self._models.get(model)
            return buckets.rate() if buckets is not None else None

    def store(self) -> None:
        """The measured rates into Redis, for a signal with no live worker of the model."""
        rates = {}
        for name, model in self.engine.models.items():
            rate = self.rate(name)
            if rate is not None:
                rates[name] = (rate, model.load_seconds)
        self._rated = set(rates)
        try:
            store_rates(self.redis, rates, time.time())
        except RedisError as e:
            log.debug("rates not stored: %s", e)

    def advertised(self, *, ready: bool, broken: Iterable[str] = ()) -> dict[str,
                                                                           WorkerModelWork]:
        """The advertisement's `work`: per model served (a broken one: never ready)."""
        remaining = self.engine.remaining_image_steps
        out = {name: worker_model_work(remaining.get(name, 0), self.rate(name),
                                       model.load_seconds, ready)
               for name, model in self.engine.models.items()}
        for name in broken:
            out[name] = worker_model_work(0, None, None, False)
        return out
