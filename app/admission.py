"""Admission: a new job is let in (or refused) and enqueued in one Redis round-trip.

The idempotency record, the caller's rate counter (`app/limits.py`) and the model's queue
depth are checked, then RQ's own enqueue commands (`contract.queueing.enqueue_commands`:
the job hash, SADD rq:queues, RPUSH onto the queue) run, the caller's listing index is
updated, an idle worker is woken, and the idempotency record is written: all in one Lua
script, atomically, so the caps hold exactly under concurrent submissions and an error
leaves no record. RQ's keys come in ARGV with the commands (a standalone Redis; RQ does not
run on Redis Cluster either).

Per submission the script sends as few commands as the layout allows: RQ's two writes of
the job hash are one HSET; a key family that lives by a fixed window (the rate counter,
the wake list) gets its expiry once, when it is created, not with every write.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi.concurrency import run_in_threadpool
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import NoScriptError

from contract import tracing
from contract.inputs import input_digest
from contract.keys import (
    WAKE_MAXLEN,
    WAKE_TTL,
    idempotency_key,
    input_key,
    jobs_index_key,
    wake_key,
)
from contract.limits import PRIORITIES
from contract.queueing import Job, enqueue_commands, model_queue_keys
from contract.spec import GenerationSpec

from . import limits
from .auth import Principal
from .errors import ApiError, not_replicated
from .jobs import JobStore
from .schemas import GenerationRequest
from .settings import ApiSettings

MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True)
class Submitted:
    """A submission's outcome: the job, whether it is an earlier one replayed for the same
    Idempotency-Key and body, and (for a new job) the jobs ahead of it as it was queued."""

    job: Job
    spec: GenerationSpec
    replayed: bool
    ahead: int | None = None


#   KEYS: 1 idempotency record or '', 2 rate counter or '', 3 the model's wake list,
#         4.. the model's queues in dequeue order
#   ARGV: 1 the record, 2 its TTL, 3 the rate limit, 4 the counter's TTL, 5 the depth cap,
#         6 the job's queue (1-based, among KEYS[4..]), 7 the wake list's bound, 8 its TTL,
#         9 '1' when a replica wait follows, 10.. each command: argc, args...
#   Returns {'replay', record}, {'rate', count}, {'depth', depth} or {'ok', jobs ahead}.
_ADMIT = """
if KEYS[1] ~= '' then
  local record = redis.call('GET', KEYS[1])
  if record then
    -- with a replica wait: rewritten as it is (a write after the job's), so the wait covers
    -- the job too; without one a replay stays read-only (it answers while Redis is full)
    if ARGV[9] == '1' then redis.call('SET', KEYS[1], record, 'KEEPTTL') end
    return {'replay', record}
  end
end
if KEYS[2] ~= '' then
  local count = redis.call('INCR', KEYS[2])
  if count == 1 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
  if count > tonumber(ARGV[3]) then return {'rate', count} end
end
local depth, ahead, own = 0, 0, tonumber(ARGV[6])
for k = 4, #KEYS do
  local n = redis.call('LLEN', KEYS[k])
  depth = depth + n
  if k - 3 <= own then ahead = ahead + n end
end
if depth >= tonumber(ARGV[5]) then return {'depth', depth} end
local i = 10
while i <= #ARGV do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
local tokens = redis.call('RPUSH', KEYS[3], 1)
if tokens == 1 then
  redis.call('EXPIRE', KEYS[3], ARGV[8])
elseif tokens > tonumber(ARGV[7]) then
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
end
if KEYS[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return {'ok', ahead}
"""


@dataclass(frozen=True)
class _Ticket:
    """A submission made ready for the admission script: its job, and the script's input."""

    job: Job
    spec: GenerationSpec
    body: str                       # the request's hash, with an Idempotency-Key
    window: limits.RateWindow | None
    keys: list[str]
    args: list[Any]


class Admission:
    def __init__(self, redis: Redis, aredis: AsyncRedis, settings: ApiSettings,
                 jobs: JobStore, id_prefix: str = "") -> None:
        self.redis = redis          # for RQ's job objects (no command is sent through it)
        self.id_prefix = id_prefix  # names this Redis in the ids made here (app/shards.py)
        self.settings = settings
        self.jobs = jobs            # a replay's lookup
        self.aredis = aredis
        self._admit = aredis.register_script(_ADMIT)

    async def submit(self, req: GenerationRequest, who: Principal,
                     idempotency_key: str | None,
                     inputs: dict[str, bytes] | None = None) -> Submitted:
        """Enqueue `req` (already checked against the served models) with its fitted input
        images (`inputs`: field → PNG, written beside the job) unless the caller's
        rate limit or the model's queue depth refuses it (429), or replay the job an
        earlier request with the same Idempotency-Key made (422 if that one had another
        body, 409 if it is still being enqueued). One Redis round-trip for a new job, from
        the event loop; only a replay's lookup goes to a thread.

        Traced (contract/tracing.py, when on): an `admission` span under the request's
        (FastAPI's server span, made once a tracer provider is set), whose context the job
        carries in its meta to the worker."""
        if not tracing.enabled():
            return await self._submit(req, who, idempotency_key, inputs)
        with tracing.tracer().start_as_current_span("admission") as span:
            sub = await self._submit(req, who, idempotency_key, inputs)
            span.set_attribute("ddpm.job_id", sub.job.id)
            span.set_attribute("ddpm.replayed", sub.replayed)
            return sub

    async def _submit(self, req: GenerationRequest, who: Principal,
                      idempotency_key: str | None,
                      inputs: dict[str, bytes] | None) -> Submitted:
        t = self._ticket(req, who, idempotency_key, inputs or {})
        if self.settings.redis_wait_replicas:
            verdict, value = await self._admit_replicated(t)
        else:
            verdict, value = await self._admit(keys=t.keys, args=t.args)
        if verdict == b"replay":
            return await run_in_threadpool(self._replayed, value, t, who)
        if verdict == b"ok":
            return Submitted(t.job, t.spec, replayed=False, ahead=int(value))
        if verdict == b"rate":
            assert t.window is not None
            raise limits.rate_limited(self.settings, t.window)
        if verdict == b"depth":
            raise limits.queue_full(self.settings, t.spec.model, int(value))
        raise RuntimeError(f"unexpected admission verdict {verdict!r}")

    async def _admit_replicated(self, t: _Ticket) -> list[Any]:
        """The admission script, then `WAIT n timeout` on the same connection in the same
        round trip (WAIT counts the replicas holding this connection's writes, so it must
        follow them there). A job (new, or replayed: the script rewrites its record) that
        fewer than `redis_wait_replicas` replicas hold is not acknowledged: 503."""
        s = self.settings
        for _ in range(2):          # the second time after a NOSCRIPT (a restarted Redis)
            async with self.aredis.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._admit.sha, len(t.keys), *t.keys, *t.args)
                pipe.execute_command("WAIT", s.redis_wait_replicas, s.redis_wait_timeout_ms)
                result, acked = await pipe.execute(raise_on_error=False)
            if not isinstance(result, NoScriptError):
                break
            await self.aredis.script_load(_ADMIT)
        for reply in (result, acked):
            if isinstance(reply, Exception):
                raise reply
        verdict, value = result
        if verdict in (b"ok", b"replay") and int(acked) < s.redis_wait_replicas:
            job = replayed_job_id(value) if verdict == b"replay" else t.job.id
            raise not_replicated(job, int(acked), s.redis_wait_replicas,
                                 s.redis_wait_timeout_ms, s.retry_after)
        return [verdict, value]

    def _ticket(self, req: GenerationRequest, who: Principal, idempotency_key: str | None,
                inputs: dict[str, bytes]) -> _Ticket:
        """The new job and the admission script's keys and arguments (no I/O)."""
        s = self.settings
        idem = idempotency_record_key(who, idempotency_key) if idempotency_key is not None \
            else ""
        spec = req.spec({f: input_digest(png) for f, png in inputs.items()})
        job_id = self.id_prefix + uuid.uuid4().hex
        body = body_hash(req) if idem else ""
        record = json.dumps({"job": job_id, "body": body}) if idem else ""
        window = limits.RateWindow.at(s, who, time.time()) if s.rate_limit else None
        meta: dict[str, Any] = {"owner": who.owner}
        carrier = tracing.inject() if tracing.enabled() else {}   # the admission span's
        if carrier:
            meta[tracing.META_FIELD] = carrier
        job, commands = enqueue_commands(
            self.redis, spec, job_id=job_id, result_ttl=s.result_ttl,
            retries=s.job_retries, timeout=s.job_timeout, meta=meta,
            webhook=req.webhook, wake=False)
        commands += self._index_commands(who, job)
        commands += [["SET", input_key(job_id, f), png, "EX", s.result_ttl]
                     for f, png in inputs.items()]
        argv: list[Any] = [record, s.idempotency_ttl, s.rate_limit, window.ttl if window else 0,
                           s.max_queue_depth, PRIORITIES.index(spec.priority) + 1,
                           WAKE_MAXLEN, WAKE_TTL, 1 if s.redis_wait_replicas else 0]
        for command in commands:
            argv.append(len(command))
            argv.extend(command)
        keys = [idem, window.key if window else "", wake_key(spec.model),
                *model_queue_keys(spec.model)]
        return _Ticket(job, spec, body, window, keys, argv)

    def _index_commands(self, who: Principal, job: Job) -> list[list[Any]]:
        """The caller's listing index (`app/listing.py`): the job scored by its creation
        time in µs; entries older than `result_ttl` and past the newest `max_listed_jobs`
        trimmed; the index expiring `result_ttl` after the caller's last submission."""
        s, key = self.settings, jobs_index_key(who.owner)
        score = micros(job.created_at)
        return [["ZADD", key, score, job.id],
                ["ZREMRANGEBYSCORE", key, "-inf", f"({score - s.result_ttl * 1_000_000}"],
                ["ZREMRANGEBYRANK", key, 0, -(s.max_listed_jobs + 1)],
                ["EXPIRE", key, s.result_ttl]]

    def _replayed(self, raw: bytes, t: _Ticket, who: Principal) -> Submitted:
        try:
            record = json.loads(raw)
        except ValueError:
            record = {}
        if not isinstance(record, dict) or record.get("body") != t.body:
            raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used "
                           "with a different request body", field="Idempotency-Key")
        try:
            job = self.jobs.get(str(record.get("job")), who)
        except ApiError:
            # The job is gone (expired, or the record outlived it).
            raise ApiError(409, "conflict", "a request with this Idempotency-Key is in "
                           "progress", headers={"Retry-After": "1"}) from None
        return Submitted(job, self.jobs.spec_of(job), replayed=True)


def replayed_job_id(record: bytes) -> str:
    """The job an idempotency record names ('?' if it names none)."""
    try:
        return str(json.loads(record).get("job", "?"))
    except (ValueError, AttributeError):
        return "?"


def idempotency_record_key(who: Principal, key: str) -> str:
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(422, "invalid_request", "Idempotency-Key must be 1 to "
                       f"{MAX_IDEMPOTENCY_KEY} printable characters", field="Idempotency-Key")
    return idempotency_key(who.owner, hashlib.sha256(key.encode()).hexdigest())


def body_hash(req: GenerationRequest) -> str:
    """The request as sent (unset fields stay unset: a random default seed must not make
    two identical requests differ)."""
    body = json.dumps(req.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def micros(t: datetime) -> int:
    return round(t.timestamp() * 1_000_000)
