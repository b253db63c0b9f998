"""How a Redis error is told apart: the one classification API and worker share."""

from __future__ import annotations

from redis.exceptions import OutOfMemoryError, ResponseError


def redis_full(error: BaseException) -> bool:
    """Whether `error` is Redis refusing a write at its `maxmemory` (noeviction): raised
    as OutOfMemoryError by a command, as a script error (`-OOM ...`) inside a Lua script."""
    return isinstance(error, OutOfMemoryError) or (
        isinstance(error, ResponseError) and "OOM command not allowed" in str(error))
