"""Many Redis writes as one command: recorded from RQ's own methods, run by one Lua script.

redis-py spends tens of microseconds of Python on every command of a pipeline (building
it, packing it, parsing its reply); RQ's bookkeeping is ~30 commands per job, so a step
that starts or ends 64 jobs cost the worker more CPU than the step itself. Here RQ's
methods write into a `pipeline` as usual, which is never executed: its commands are sent as
the arguments of a single EVALSHA of `_RUN`, which replays them inside Redis. That is one
command to pack and one reply to parse, and atomic (a script runs alone), which also gives
the guarded groups that replace WATCH: a group of commands runs only if its guard holds
when the script runs (the job was not canceled; it has no dependents). One pseudo-command,
`ddpm.frame` (frames.py), appends a snapshot within its job's byte budget.

Scripts touch keys they are not given in KEYS, so this needs a standalone Redis (or one
Redis Cluster slot), as the rest of RQ's multi-key transactions do.

The scripts' arguments are packed by hiredis in one call (`evalsha`, `PackedScript`):
redis-py's own packing runs ~1 µs of Python per argument (an encoder call and type checks
each), so a step's writes of a hundred 1-image jobs cost more to pack than to run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import Redis
from redis.exceptions import NoScriptError

try:
    from hiredis import pack_command
except ImportError:          # a declared dependency; without it, redis-py packs
    pack_command = None  # type: ignore[assignment]

from contract.recorder import Command, Recorder

from .frames import FRAME_COMMAND, FRAME_LUA

Guard = Literal["", "not-canceled", "absent"]

# ARGV: per group: guard, guard key, number of commands; per command: number of args, args.
# Returns one flag per group: 1 if it ran, 0 if its guard did not hold.
_RUN = """
local i, out = 1, {}
while i <= #ARGV do
  local guard, key, ncmds = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local ok = true
  if guard == 'not-canceled' then
    local s = redis.call('HGET', key, 'status')
    ok = (s ~= false) and (s ~= 'canceled')
  elseif guard == 'absent' then
    ok = redis.call('EXISTS', key) == 0
  end
  out[#out + 1] = ok and 1 or 0
  for _ = 1, ncmds do
    local n = tonumber(ARGV[i])
    if ok then
      if ARGV[i + 1] == 'ddpm.frame' then ddpm_frame(i + 2, i + n)
      else redis.call(unpack(ARGV, i + 1, i + n)) end
    end
    i = i + n + 1
  end
end
return out
"""


@dataclass
class _Group:
    guard: Guard
    key: str
    commands: list[Command] = field(default_factory=list)


class WriteBatch:
    """Groups of recorded writes, sent in one round-trip by `run`."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._groups: list[_Group] = []

    def group(self, guard: Guard = "", key: str = "") -> Any:
        """A pipeline to hand to RQ's methods (and to write into directly); its commands
        form one group, run only where `guard` holds for `key` when the batch runs."""
        g = _Group(guard, key)
        self._groups.append(g)
        return Recorder(self.redis, g.commands)

    def __len__(self) -> int:
        return len(self._groups)

    def run(self, script: Any) -> list[bool]:
        """Run every group (`script`: `register_script(SCRIPT)` of this module's `SCRIPT`,
        on any client); whether each group's guard held."""
        if not self._groups:
            return []
        argv: list[Any] = []
        for g in self._groups:
            argv += [g.guard, g.key, len(g.commands)]
            for args in g.commands:
                argv.append(len(args))
                argv += args
        self._groups = []
        return [bool(flag) for flag in script(keys=[], args=argv)]


def evalsha(redis: Redis, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """EVALSHA `sha` with `keys` and `args` (str, bytes, int or float), its arguments packed
    by hiredis in one call and sent on a connection of `redis`'s pool, with redis-py's own
    retry and disconnect on a connection error, as its `execute_command` does. Where hiredis
    is missing, the client holds one connection of its own, or an argument is of another
    type, redis-py's `evalsha` instead (which then says what is wrong with it)."""
    if pack_command is None or redis.connection is not None:
        return redis.evalsha(sha, len(keys), *keys, *args)
    try:
        packed = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
    except TypeError:
        return redis.evalsha(sha, len(keys), *keys, *args)
    pool = redis.connection_pool
    conn = pool.get_connection()

    def send() -> Any:
        conn.send_packed_command([packed])
        return conn.read_response()

    try:
        return conn.retry.call_with_retry(send, lambda _: conn.disconnect())
    finally:
        pool.release(conn)


class PackedScript:
    """A Lua script on one client, called as redis-py's `Script` is (`script(keys, args)`)
    but sent through `evalsha`; loaded again where Redis lost it (NOSCRIPT)."""

    def __init__(self, redis: Redis, script: str) -> None:
        self.redis = redis
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return evalsha(self.redis, self.sha, keys, args)
        except NoScriptError:
            self.redis.script_load(self.script)
            return evalsha(self.redis, self.sha, keys, args)


assert f"'{FRAME_COMMAND}'" in _RUN
SCRIPT = FRAME_LUA + _RUN
"""The script to register: `_RUN`, which also runs frames.FRAME_LUA for `ddpm.frame`."""
