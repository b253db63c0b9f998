"""A cap on open event streams (SSE and WebSocket), per API process and per caller.

Every open stream holds a socket, a task and, while it waits in `XREAD BLOCK`, a Redis
connection of its own. Without a cap, a few thousand idle streams exhaust file descriptors
or Redis' `maxclients` and take every other request down with them; with it, the stream
past the cap gets a clear `503` (the process is full) or `429` (this caller holds too many)
with `Retry-After`, and everything else keeps working.

All streams of a process run on its one event loop, so plain counters need no lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import ApiError


class StreamSlots:
    def __init__(self, total: int, per_caller: int, retry_after: int,
                 on_change: Callable[[int], object] | None = None) -> None:
        self.total, self.per_caller, self.retry_after = total, per_caller, retry_after
        self.open = 0
        self._by_caller: Counter[str] = Counter()
        self._on_change = on_change or (lambda _: None)   # the gauge, told each new count

    def acquire(self, caller: str) -> None:
        """Take a slot for `caller`, or raise the 503/429 the client should see."""
        headers = {"Retry-After": str(self.retry_after)}
        if self.open >= self.total:
            raise ApiError(503, "too_many_streams", f"this server already has {self.open} "
                           "open event streams (its limit); retry later or poll "
                           "GET /v1/generations/{id} instead", headers=headers)
        if self._by_caller[caller] >= self.per_caller:
            raise ApiError(429, "too_many_streams", f"you already have {self.per_caller} "
                           "open event streams (the limit per caller); close one first",
                           headers=headers)
        self.open += 1
        self._by_caller[caller] += 1
        self._on_change(self.open)

    def release(self, caller: str) -> None:
        self.open -= 1
        self._by_caller[caller] -= 1
        if self._by_caller[caller] <= 0:
            del self._by_caller[caller]
        self._on_change(self.open)

    @contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        self.acquire(caller)
        try:
            yield
        finally:
            self.release(caller)
