"""RQ's Redis layout for starting and succeeding jobs, written directly by two Lua scripts
(and read by the take script, below: jobs moved to RQ's intermediate lists, with their hashes).

RQ's own methods (`Execution.create`, `Job.heartbeat`, `Job.prepare_for_execution`,
`Job._handle_success` with its `Job.save` of the whole hash and `Result.create`,
`Job.cleanup`, `cleanup_execution`, the worker's counters) cost ~1 ms of Python per job in
a batching worker, most of it in redis-py packing ~100 arguments per job (the whole job
hash, zlib-compressed payload included, is re-saved on success though only two fields
changed). Here each step's starts, and each step's successes, are one EVALSHA with ~10
arguments per job; the scripts write what those methods write, minus writes that change
nothing (a second `last_heartbeat`, the unchanged fields of the re-saved hash, one expiry
of the worker's execution set per job, the expiry of a dependents key the guard has just
found absent), with timestamps in RQ's own formats (`rq.utils.utcformat` for the job hash,
epoch floats for executions and results): each start its own, in take order; one end per
batch of successes.

Key names come from RQ's own classes (computed once, see `RqNames`); the hash and stream
field names written here are RQ's, listed in `JOB_START_FIELDS`, `EXECUTION_FIELDS`,
`JOB_SUCCESS_FIELDS`, `RESULT_FIELDS` and `WORKER_FIELDS`, and tests/worker/test_rq_surface.py
records RQ's own methods writing them to check each list against the pinned RQ. The rare
endings (failure, retry, dependents, callbacks, repeats, a result TTL of 0) keep RQ's own
methods (jobs.py).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis import Redis

from ..redis_batch import PackedScript
from .surface import (
    WORKER_EXECUTIONS_KEY_TEMPLATE,
    Execution,
    ExecutionRegistry,
    Job,
    JobStatus,
    Result,
    WorkerStatus,
    current_timestamp,
    now,
    utcformat,
)

# The fields each script writes, by hand, where RQ writes them (checked by the surface test).
EXECUTION_FIELDS = ("id", "job_id", "created_at", "last_heartbeat", "worker_name")
"""Execution.serialize (rq/executions.py), saved by Execution.create."""
JOB_START_FIELDS = ("last_heartbeat", "status", "started_at", "worker_name")
"""Job.prepare_for_execution (rq/job.py); Job.heartbeat writes its first one again."""
JOB_SUCCESS_FIELDS = ("status", "ended_at")
"""What Job._handle_success's set_status and save change in a started job's hash."""
RESULT_FIELDS = ("type", "worker_name", "return_value", "execution_id",
                 "execution_started_at", "execution_ended_at")
"""Result.serialize (rq/results.py) of a successful result, in its order."""
WORKER_FIELDS = ("last_heartbeat", "state", "successful_job_count", "total_working_time")
"""BaseWorker.heartbeat, set_state, increment_successful_job_count,
increment_total_working_time (rq/worker/base.py)."""
RESULTS_MAXLEN = 10
"""Result.save's `xadd(..., maxlen=10)` (approximate, redis-py's default)."""

# ARGV: the header (see Layout.start), then per job: id, execution id, intermediate list,
# started registry, its start (RQ's utcformat, and epoch seconds). Per job, 1 where it
# started, 0 where its status said canceled or its hash was gone (nothing written for it);
# every job leaves its intermediate list.
_START = """
local wkey, wexec, wname, wutc = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, sscore, escore, ettl, wttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local busy, started_s, canceled_s = ARGV[10], ARGV[11], ARGV[12]
local jp, xp, xrp = ARGV[13], ARGV[14], ARGV[15]
local out, i = {}, 16
while i <= #ARGV do
  local id, ex, inter, started = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local utc, ts = ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  redis.call('LREM', inter, 1, id)
  local jkey = jp .. id
  local s = redis.call('HGET', jkey, 'status')
  if s and s ~= canceled_s then
    local composite = id .. ':' .. ex
    local xkey = xp .. composite
    redis.call('HSET', xkey, 'id', ex, 'job_id', id, 'created_at', ts,
               'last_heartbeat', ts, 'worker_name', wname)
    redis.call('EXPIRE', xkey, ttl)
    redis.call('ZADD', xrp .. id, escore, ex)
    redis.call('EXPIRE', xrp .. id, ettl)
    redis.call('ZADD', started, sscore, composite)
    redis.call('SADD', wexec, composite)
    redis.call('HSET', jkey, 'last_heartbeat', utc, 'status', started_s,
               'started_at', utc, 'worker_name', wname)
    redis.call('PERSIST', jkey)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
redis.call('HSET', wkey, 'last_heartbeat', wutc, 'state', busy)
redis.call('EXPIRE', wkey, wttl)
redis.call('EXPIRE', wexec, wttl)
return out
"""

# ARGV: the header, then per job: id, execution id, started registry, finished registry,
# result TTL (> 0, or -1: forever), return value (RQ's base64), execution start (epoch),
# seconds worked, meta ('' : unchanged). Per job, 1 where it succeeded here, 0 where it
# has dependents (nothing written for it: RQ's own path enqueues them).
_SUCCEED = """
local wkey, wexec, wname, utc, ts = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, finished_s, maxlen = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local jp, xp, xrp, rp, dsfx, dpre, dsfx2 = ARGV[9], ARGV[10], ARGV[11], ARGV[12],
  ARGV[13], ARGV[14], ARGV[15]
local out, i, count, worked = {}, 16, 0, 0
while i <= #ARGV do
  local id, ex, started, finished = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local ttl, value, xstart, secs, meta = tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6],
    ARGV[i + 7], ARGV[i + 8]
  i = i + 9
  if redis.call('EXISTS', jp .. id .. dsfx) == 0 then
    local jkey, rkey, composite = jp .. id, rp .. id, id .. ':' .. ex
    count = count + 1
    worked = worked + tonumber(secs)
    if meta ~= '' then
      redis.call('HSET', jkey, 'status', finished_s, 'ended_at', utc, 'meta', meta)
    else
      redis.call('HSET', jkey, 'status', finished_s, 'ended_at', utc)
    end
    redis.call('XADD', rkey, 'MAXLEN', '~', maxlen, '*', 'type', '$SUCCESSFUL',
               'worker_name', wname, 'return_value', value, 'execution_id', ex,
               'execution_started_at', xstart, 'execution_ended_at', ts)
    if ttl < 0 then
      redis.call('PERSIST', rkey)
      redis.call('ZADD', finished, '+inf', id)
    else
      redis.call('EXPIRE', rkey, ttl)
      redis.call('ZADD', finished, now + ttl, id)
      redis.call('EXPIRE', jkey, ttl)
      redis.call('EXPIRE', dpre .. id .. dsfx2, ttl)
    end
    redis.call('DEL', xp .. composite)
    redis.call('ZREM', started, composite)
    redis.call('ZREM', xrp .. id, ex)
    redis.call('SREM', wexec, composite)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if count > 0 then
  redis.call('HINCRBY', wkey, 'successful_job_count', count)
  redis.call('HINCRBYFLOAT', wkey, 'total_working_time', string.format('%.6f', worked))
end
return out
"""


# Move up to ARGV[1] jobs from the first non-empty queues (KEYS: queue, its intermediate
# list, ... in priority order) to the end of their intermediate lists, in one atomic step,
# and return, per job: its queue key, its id, its hash (flat) and its execution ids
# (ARGV[2], ARGV[3]: the job and execution registry key prefixes). The last ARGV[4] KEYS
# are wake lists: unless ARGV[5] is '1' (look anyway), it looks only when one holds a
# token, and takes them all (every job enqueued before this instant is then seen).
TAKE = """
local want, out = tonumber(ARGV[1]), {}
local nwake = tonumber(ARGV[4] or '0')
local nq = #KEYS - nwake
if nwake > 0 then
  local wake = {unpack(KEYS, nq + 1, #KEYS)}
  if ARGV[5] ~= '1' and redis.call('EXISTS', unpack(wake)) == 0 then return out end
  redis.call('DEL', unpack(wake))
end
for i = 1, nq, 2 do
  while #out < 4 * want do
    local id = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT')
    if not id then break end
    out[#out + 1] = KEYS[i]
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGETALL', ARGV[2] .. id)
    out[#out + 1] = redis.call('ZRANGE', ARGV[3] .. id, 0, -1)
  end
  if #out >= 4 * want then break end
end
return out
"""

# One hash field of each key (nil where the key or the field is missing).
HGET_EACH = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGET', KEYS[i], ARGV[1]) end
return out
"""


_ID, _EX = "ddpm-marker-job", "ddpm-marker-execution"
_NO_CONNECTION = Redis()        # never connects: RQ's constructors only keep it


_SUCCEED = _SUCCEED.replace("$SUCCESSFUL", str(Result.Type.SUCCESSFUL.value))


def _around(key: str, marker: str = _ID) -> tuple[str, str]:
    """(prefix, suffix) of a key RQ built around `marker`."""
    prefix, found, suffix = key.partition(marker)
    assert found, f"{marker} not in {key}"
    return prefix, suffix


@dataclass(frozen=True)
class RqNames:
    """RQ's key names, taken from RQ's own classes once (an upgrade that renames one
    changes them here, not in a copy)."""

    job: str = Job.redis_job_namespace_prefix
    execution: str = _around(Execution(_EX, _ID, _NO_CONNECTION).key)[0]
    executions: str = ExecutionRegistry.key_template.format("")
    results: str = Result.get_key("")
    dependents_suffix: str = _around(Job(_ID, connection=_NO_CONNECTION).dependents_key)[1]
    dependencies: tuple[str, str] = _around(Job(_ID, connection=_NO_CONNECTION).dependencies_key)
    started: str = JobStatus.STARTED.value
    canceled: str = JobStatus.CANCELED.value
    finished: str = JobStatus.FINISHED.value

    @staticmethod
    def worker_executions(worker_name: str) -> str:
        return WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)


NAMES = RqNames()


class Layout:
    """The two scripts on one connection, and their arguments."""

    def __init__(self, redis: Any) -> None:
        self._start = PackedScript(redis, _START)
        self._succeed = PackedScript(redis, _SUCCEED)

    def start(self, worker: Any, jobs: list[tuple[str, str, str, str, datetime]],
              execution_ttl: int, heartbeat_ttl: int) -> list[bool]:
        """Mark started, as RQ's Execution.create + Job.heartbeat + prepare_for_execution
        + the worker's heartbeat and busy state do, every job of `jobs` (id, execution id,
        intermediate list, started registry, when it starts) whose status is not canceled
        when the script runs."""
        stamp = current_timestamp()
        last = max((j[4] for j in jobs), default=None) or now()
        argv: list[Any] = [
            worker.key, NAMES.worker_executions(worker.name), worker.name, utcformat(last),
            execution_ttl, stamp + execution_ttl, stamp + execution_ttl + 60,
            execution_ttl + 60, heartbeat_ttl, WorkerStatus.BUSY.value,
            NAMES.started, NAMES.canceled, NAMES.job, NAMES.execution, NAMES.executions]
        for job_id, execution_id, intermediate, started, when in jobs:
            argv += (job_id, execution_id, intermediate, started, utcformat(when),
                     repr(when.timestamp()))
        return [bool(x) for x in self._start(keys=[], args=argv)]

    def succeed(self, worker: Any, jobs: list[SuccessArgs], when: datetime) -> list[bool]:
        """RQ's success writes (handle_job_success without dependents, repeats or
        callbacks) for every job of `jobs` that has no dependents when it runs."""
        argv: list[Any] = [
            worker.key, NAMES.worker_executions(worker.name), worker.name, utcformat(when),
            repr(when.timestamp()), current_timestamp(), NAMES.finished, RESULTS_MAXLEN,
            NAMES.job, NAMES.execution, NAMES.executions, NAMES.results,
            NAMES.dependents_suffix, *NAMES.dependencies]
        for s in jobs:
            argv += (s.job_id, s.execution_id, s.started_key, s.finished_key, s.result_ttl,
                     s.return_value, repr(s.execution_started), f"{s.worked:.6f}", s.meta)
        return [bool(x) for x in self._succeed(keys=[], args=argv)]


@dataclass(frozen=True)
class SuccessArgs:
    """One job's success, as the script takes it."""

    job_id: str
    execution_id: str
    started_key: str
    finished_key: str
    result_ttl: int             # > 0, or -1 (forever)
    return_value: str           # Result.serialize's: base64 of the serializer's bytes
    execution_started: float    # epoch seconds
    worked: float               # seconds, for the worker's total_working_time
    meta: bytes | str = ""      # the job's serialized meta to store with it ('': unchanged)


def return_value(serializer: Any, value: Any) -> str:
    """A result's `return_value` field as Result.serialize writes it."""
    return base64.b64encode(serializer.dumps(value)).decode()
