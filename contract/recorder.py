"""A redis-py pipeline that records the commands written into it and never runs them.

RQ's methods write their bookkeeping into a `pipeline` argument; given a `Recorder`, those
exact commands are captured (through redis-py's public staging hook,
`Pipeline.pipeline_execute_command`) for a caller that sends them its own way: the API runs
a job's enqueue commands inside its admission script (`contract.queueing.enqueue_commands`),
the worker replays a step's writes inside one Lua script (`worker/redis_batch.py`).
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.client import Pipeline

Command = tuple[Any, ...]


class Recorder(Pipeline):
    """Every command written into it lands in `commands`; `execute` refuses: the commands
    are run by whoever recorded them."""

    def __init__(self, redis: Redis, commands: list[Command]) -> None:
        super().__init__(redis.connection_pool, redis.response_callbacks, False, None)
        self.commands = commands

    def pipeline_execute_command(self, *args: Any, **options: Any) -> Recorder:
        self.commands.append(args)
        return self

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        raise RuntimeError("recorded commands are run by their recorder's caller, "
                           "never execute()")
