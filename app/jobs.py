"""Jobs as the API sees them: submit (with idempotency), look up (owner-checked), report,
cancel. RQ stays the source of truth; this module only reads and writes through it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi.concurrency import run_in_threadpool
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import now, utcformat

from contract.events import Event, EventType
from contract.inputs import input_digest
from contract.keys import (
    JOB_FUNC,
    SERIALIZER,
    events_key,
    idempotency_key,
    image_key,
    input_key,
    jobs_index_key,
    queue_name,
)
from contract.limits import PRIORITIES
from contract.queueing import enqueue_commands, fetch_job
from contract.spec import GenerationSpec, ModelInfo
from contract.workers import live_worker_keys

from . import limits
from .auth import Principal
from .errors import ApiError, not_found
from .schemas import Generation, GenerationRequest, Links, Progress
from .settings import ApiSettings

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_IDEMPOTENCY_KEY = 255

_STATUS = {
    JobStatus.CREATED: "queued", JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued", JobStatus.READY_TO_ENQUEUE: "queued",
    JobStatus.RATE_LIMITED: "queued", JobStatus.STARTED: "running",
    JobStatus.FINISHED: "succeeded", JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled", JobStatus.CANCELED: "canceled",
}

# Statuses of a job that ended before all its images were made: it lists only the ones it
# stored (JobStore.view).
ENDED_WITHOUT_IMAGES = ("failed", "canceled")


def api_status(rq_status: JobStatus | str | None) -> str:
    if rq_status is None:
        return "canceled"
    return _STATUS.get(JobStatus(rq_status), "queued")


@dataclass(frozen=True)
class Served:
    """A model and how many live workers advertise it."""

    info: ModelInfo
    workers: int


@dataclass(frozen=True)
class Submitted:
    """A submission's outcome: the job, whether it is an earlier one replayed for the same
    Idempotency-Key and body, and (for a new job) the jobs ahead of it as it was queued."""

    job: Job
    spec: GenerationSpec
    replayed: bool
    ahead: int | None = None


# Admission and enqueue in one round-trip, atomically: the idempotency record, the caller's
# rate counter and the model's queue depth are checked, then RQ's own enqueue commands (the
# job hash, SADD rq:queues, RPUSH onto the queue: `enqueue_commands`) run, then the
# idempotency record is written; an error in them leaves no record. RQ's keys come in ARGV
# with the commands (a standalone Redis; RQ does not run on Redis Cluster either).
#   KEYS: 1 idempotency record or '', 2 rate counter or '', 3.. the model's queues in
#         dequeue order
#   ARGV: 1 the record, 2 its TTL, 3 the rate limit, 4 the counter's TTL, 5 the depth cap,
#         6 the job's queue (1-based, among KEYS[3..]), 7.. each command: argc, args...
#   Returns {'replay', record}, {'rate', count}, {'depth', depth} or {'ok', jobs ahead}.
_ADMIT = """
if KEYS[1] ~= '' then
  local record = redis.call('GET', KEYS[1])
  if record then return {'replay', record} end
end
if KEYS[2] ~= '' then
  local count = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  if count > tonumber(ARGV[3]) then return {'rate', count} end
end
local depth, ahead, own = 0, 0, tonumber(ARGV[6])
for k = 3, #KEYS do
  local n = redis.call('LLEN', KEYS[k])
  depth = depth + n
  if k - 2 <= own then ahead = ahead + n end
end
if depth >= tonumber(ARGV[5]) then return {'depth', depth} end
local i = 7
while i <= #ARGV do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
if KEYS[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return {'ok', ahead}
"""


# A canceled job's end: its end time and TTL, unless its hash is gone (KEYS[1]: the job
# hash; ARGV: ended_at, TTL).
_ENDED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'ended_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
"""


@dataclass(frozen=True)
class _Admission:
    """A submission made ready for the admission script: its job, and the script's input."""

    job: Job
    spec: GenerationSpec
    body: str                       # the request's hash, with an Idempotency-Key
    window: Any                     # limits.RateWindow, or None without a rate limit
    keys: list[str]
    args: list[Any]


class JobStore:
    def __init__(self, redis: Redis, settings: ApiSettings,
                 aredis: AsyncRedis | None = None) -> None:
        self.redis = redis
        self.aredis = aredis        # for the routes that run on the event loop
        self.settings = settings
        self._admit = redis.register_script(_ADMIT)
        self._async_admit = aredis.register_script(_ADMIT) if aredis is not None else None
        self._ended = redis.register_script(_ENDED)
        # The served models, read at most every `models_cache_s` (and at once for a model
        # not in them): a POST does not read every worker's advertisement.
        self._served: tuple[float, dict[str, Served]] = (-math.inf, {})

    # -- workers and models ------------------------------------------------------------

    def live_workers(self) -> list[dict[str, Any]]:
        """The advertisements of live workers (each expires unless its worker renews it)."""
        keys = live_worker_keys(self.redis, time.time())
        docs = []
        for raw in self.redis.mget(keys) if keys else []:
            if raw is None:
                continue
            try:
                docs.append(json.loads(raw))
            except ValueError:
                continue
        return docs

    def served_models(self) -> dict[str, Served]:
        seen: dict[str, Served] = {}
        for doc in self.live_workers():
            if doc.get("draining"):
                continue
            for m in doc.get("models", []):
                try:
                    info = ModelInfo.from_dict(m)
                except (TypeError, KeyError):
                    continue
                prev = seen.get(info.name)
                seen[info.name] = Served(info, (prev.workers if prev else 0) + 1)
        served = dict(sorted(seen.items()))
        self._served = (time.monotonic(), served)
        return served

    def recent_models(self, want: str | None) -> dict[str, Served]:
        """`served_models`, as read up to `models_cache_s` ago unless `want` is missing
        from them (`None`: whichever they are)."""
        served = self.cached_models()
        if served is not None and (want is None or want in served):
            return served
        return self.served_models()

    def cached_models(self) -> dict[str, Served] | None:
        """The served models as read less than `models_cache_s` ago, else None."""
        at, served = self._served
        return served if time.monotonic() - at < self.settings.models_cache_s else None

    def queue_keys(self, model: str) -> list[str]:
        """The model's RQ queue lists, in dequeue order."""
        return [Queue.redis_queue_namespace_prefix + queue_name(model, p) for p in PRIORITIES]

    def queued(self, model: str) -> int:
        with self.redis.pipeline(transaction=False) as p:
            for key in self.queue_keys(model):
                p.llen(key)
            return sum(p.execute())

    # -- submit ----------------------------------------------------------------------

    def submit(self, req: GenerationRequest, who: Principal, idempotency_key: str | None,
               inputs: dict[str, bytes] | None = None) -> Submitted:
        """Enqueue `req` (already checked against the served models) with its fitted input
        images (`inputs`: field → PNG, written beside the job) unless the caller's
        rate limit or the model's queue depth refuses it (429), or replay the job an
        earlier request with the same Idempotency-Key made (422 if that one had another
        body, 409 if it is still being enqueued). One Redis round-trip for a new job."""
        adm = self._admission(req, who, idempotency_key, inputs)
        verdict, value = self._admit(keys=adm.keys, args=adm.args)
        if verdict == b"replay":
            return self._replayed(value, adm, who)
        return self._admitted(adm, verdict, value)

    async def asubmit(self, req: GenerationRequest, who: Principal,
                      idempotency_key: str | None,
                      inputs: dict[str, bytes] | None = None) -> Submitted:
        """`submit` on the event loop: the admission script through the async client (no
        thread-pool hop per POST); only a replay's lookup goes to a thread."""
        adm = self._admission(req, who, idempotency_key, inputs)
        assert self._async_admit is not None, "JobStore made without an async client"
        verdict, value = await self._async_admit(keys=adm.keys, args=adm.args)
        if verdict == b"replay":
            return await run_in_threadpool(self._replayed, value, adm, who)
        return self._admitted(adm, verdict, value)

    def _admission(self, req: GenerationRequest, who: Principal, idempotency_key: str | None,
                   inputs: dict[str, bytes] | None = None) -> _Admission:
        """The new job and the admission script's keys and arguments (no I/O)."""
        s = self.settings
        idem = record = ""
        if idempotency_key is not None:
            idem = self._idem_key(who, idempotency_key)
        inputs = inputs or {}
        spec = req.spec({f: input_digest(png) for f, png in inputs.items()})
        job_id = uuid.uuid4().hex
        body = self._body_hash(req) if idem else ""
        if idem:
            record = json.dumps({"job": job_id, "body": body})
        window = limits.RateWindow.at(s, who, time.time()) if s.rate_limit else None
        job, commands = enqueue_commands(
            self.redis, spec, job_id=job_id, result_ttl=s.result_ttl,
            retries=s.job_retries, timeout=s.job_timeout, meta={"owner": who.owner},
            webhook=req.webhook)
        commands += self._index_commands(who, job)
        commands += [["SET", input_key(job_id, f), png, "EX", s.result_ttl]
                     for f, png in inputs.items()]
        argv: list[Any] = [record, s.idempotency_ttl, s.rate_limit, window.ttl if window else 0,
                           s.max_queue_depth, PRIORITIES.index(spec.priority) + 1]
        for command in commands:
            argv.append(len(command))
            argv.extend(command)
        keys = [idem, window.key if window else "", *self.queue_keys(spec.model)]
        return _Admission(job, spec, body, window, keys, argv)

    def _admitted(self, adm: _Admission, verdict: bytes, value: Any) -> Submitted:
        if verdict == b"ok":
            return Submitted(adm.job, adm.spec, replayed=False, ahead=int(value))
        if verdict == b"rate":
            assert adm.window is not None
            raise limits.rate_limited(self.settings, adm.window)
        if verdict == b"depth":
            raise limits.queue_full(self.settings, adm.spec.model, int(value))
        raise RuntimeError(f"unexpected admission verdict {verdict!r}")

    def _replayed(self, value: bytes, adm: _Admission, who: Principal) -> Submitted:
        replayed = self._replay(value, adm.body, who)
        return Submitted(replayed, self.spec_of(replayed), replayed=True)

    def _index_commands(self, who: Principal, job: Job) -> list[list[Any]]:
        """The caller's listing index (`list_jobs`), written by the admission script with
        the enqueue: the job scored by its creation time in µs; entries older than
        `result_ttl` and past the newest `max_listed_jobs` trimmed; the index expiring
        `result_ttl` after the caller's last submission."""
        s, key = self.settings, jobs_index_key(who.owner)
        score = _micros(job.created_at)
        return [["ZADD", key, score, job.id],
                ["ZREMRANGEBYSCORE", key, "-inf", f"({score - s.result_ttl * 1_000_000}"],
                ["ZREMRANGEBYRANK", key, 0, -(s.max_listed_jobs + 1)],
                ["EXPIRE", key, s.result_ttl]]

    def _idem_key(self, who: Principal, key: str) -> str:
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise ApiError(422, "invalid_request", "Idempotency-Key must be 1 to "
                           f"{MAX_IDEMPOTENCY_KEY} printable characters",
                           field="Idempotency-Key")
        digest = hashlib.sha256(key.encode()).hexdigest()
        return idempotency_key(who.owner, digest)

    @staticmethod
    def _body_hash(req: GenerationRequest) -> str:
        """The request as sent (unset fields stay unset: a random default seed must not
        make two identical requests differ)."""
        body = json.dumps(req.model_dump(mode="json", exclude_unset=True), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def _replay(self, raw: bytes, body: str, who: Principal) -> Job:
        try:
            record = json.loads(raw)
        except ValueError:
            record = {}
        if not isinstance(record, dict) or record.get("body") != body:
            raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used "
                           "with a different request body", field="Idempotency-Key")
        try:
            return self.get(str(record.get("job")), who)
        except ApiError:
            # The job is gone (expired, or the record outlived it).
            raise ApiError(409, "conflict", "a request with this Idempotency-Key is in "
                           "progress", headers={"Retry-After": "1"}) from None

    # -- look up ----------------------------------------------------------------------

    def get(self, job_id: str, who: Principal) -> Job:
        """The job, if it exists, is a generation, and belongs to the caller; else 404."""
        if not JOB_ID.match(job_id):
            raise not_found("generation")
        try:
            job = fetch_job(self.redis, job_id)
        except NoSuchJobError:
            raise not_found("generation") from None
        except RedisError:
            raise                # 503, not a 404 that says the job is gone
        except Exception:      # a foreign job whose payload is not ours to decode
            raise not_found("generation") from None
        return self._owned(job, who)

    async def aget(self, job_id: str, who: Principal) -> Job:
        """`get` on the event loop: the hash read through the async client (RQ's own
        `restore` builds the job, bound to the sync client for what follows)."""
        if not JOB_ID.match(job_id):
            raise not_found("generation")
        assert self.aredis is not None, "JobStore made without an async client"
        raw = await self.aredis.hgetall(Job.key_for(job_id))     # RedisError: a 503
        if not raw:
            raise not_found("generation")
        try:
            job = Job(job_id, connection=self.redis, serializer=SERIALIZER)
            job.restore(raw)
        except Exception:      # a hash RQ cannot read is not a generation of ours
            raise not_found("generation") from None
        return self._owned(job, who)

    @staticmethod
    def _owned(job: Job, who: Principal) -> Job:
        try:
            ours = job.func_name == JOB_FUNC and who.owns(job.meta.get("owner"))
        except Exception:      # a payload that is not ours to decode
            ours = False
        if not ours:
            raise not_found("generation")
        return job

    @staticmethod
    def spec_of(job: Job) -> GenerationSpec:
        return GenerationSpec.model_validate(job.kwargs)

    def view(self, job: Job, base: str = "", *, spec: GenerationSpec | None = None,
             ahead: int | None = None, stored: list[int] | None = None) -> Generation:
        """The job as the API reports it; `spec`, `ahead` (its queue position) and `stored`
        (`stored_images`) when the caller knows them already (a fresh submission): then no
        Redis read is needed.

        `links.images` lists the images that exist or will: all of a queued, running or
        succeeded job, only those a canceled or failed job stored before it ended (never a
        URL that will only answer 404); `images` lists the same once the job has ended."""
        spec = spec or self.spec_of(job)
        status = api_status(job.get_status(refresh=False))
        meta = job.meta or {}
        n, steps = spec.num_images, spec.steps_per_image
        if status == "succeeded":
            image_steps, images_done = [steps] * n, n
        else:
            image_steps = list(meta.get("image_steps") or [0] * n)
            images_done = int(meta.get("images_done", 0))
        done = sum(image_steps)
        root = f"{base}/v1/generations/{job.id}"
        if status in ENDED_WITHOUT_IMAGES:
            kept = self.stored_images([(job.id, n)])[job.id] if stored is None else stored
        else:
            kept = list(range(n))
        image_urls = [f"{root}/images/{i}" for i in kept]
        error = None
        if status == "failed":
            result = job.latest_result()
            error = (result.exc_string if result and result.exc_string else None) or \
                "the job failed"
        if status != "queued":
            ahead = None
        elif ahead is None:
            ahead = self.position(job, spec)
        return Generation(
            id=job.id, status=status, model=spec.model,  # type: ignore[arg-type]
            created_at=job.created_at, started_at=job.started_at,
            finished_at=job.ended_at if status in ("succeeded", "failed", "canceled") else None,
            queue_position=ahead,
            progress=Progress(steps_done=done, total_steps=spec.total_steps,
                              fraction=round(done / spec.total_steps, 4),
                              images_done=images_done, num_images=n, steps_per_image=steps,
                              image_steps=image_steps),
            images=image_urls if status not in ("queued", "running") else [],
            error=error, request=spec,
            links=Links(self_=root, events=f"{root}/events", websocket=f"{root}/ws",
                        images=image_urls, grid=f"{root}/grid.png",
                        animation=f"{root}/animation.gif"))

    def stored_images(self, jobs: list[tuple[str, int]]) -> dict[str, list[int]]:
        """The indices of the final images each job (id, num_images) has in Redis, all in
        one round-trip."""
        with self.redis.pipeline(transaction=False) as p:
            for job_id, n in jobs:
                for i in range(n):
                    p.exists(image_key(job_id, i))
            found = iter(p.execute())
        return {job_id: [i for i in range(n) if next(found)] for job_id, n in jobs}

    def position(self, job: Job, spec: GenerationSpec) -> int | None:
        """Jobs ahead: everything in the model's higher-priority queues, plus this queue's
        entries before the job (one round-trip)."""
        keys = self.queue_keys(spec.model)
        own = PRIORITIES.index(spec.priority)
        with self.redis.pipeline(transaction=False) as p:
            for key in keys[:own]:
                p.llen(key)
            p.lpos(keys[own], job.id)
            *higher, pos = p.execute()
        return None if pos is None else sum(higher) + pos

    # -- cancel ------------------------------------------------------------------------

    def cancel(self, job: Job) -> None:
        """Cancel a queued or running job; 409 if it has ended already."""
        status = api_status(job.get_status(refresh=True))
        if status not in ("queued", "running"):
            raise ApiError(409, "conflict", f"the generation has already {status_verb(status)}")
        try:
            job.cancel()
        except InvalidJobOperation as e:
            raise ApiError(409, "conflict", str(e)) from None
        # RQ gives a canceled job's hash no TTL (it would stay forever) and no end time
        # (`finished_at` stayed null); a hash deleted meanwhile is not recreated.
        self._ended(keys=[job.key], args=[utcformat(now()), self.settings.result_ttl])
        if status == "queued":
            # No worker has it, so none will announce the cancellation: do it here (a
            # worker that took it at this instant announces too; readers stop at the first).
            key = events_key(job.id)
            with self.redis.pipeline(transaction=False) as p:
                p.xadd(key, Event(EventType.CANCELED, {"message": "canceled"}).to_fields(),
                       maxlen=self.settings.stream_maxlen, approximate=True)
                p.expire(key, self.settings.result_ttl)
                p.execute()

    def fetch_images(self, job: Job, indices: Iterable[int]) -> list[bytes | None]:
        keys = [image_key(job.id, i) for i in indices]
        return list(self.redis.mget(keys)) if keys else []

    # -- list ------------------------------------------------------------------------

    def list_jobs(self, who: Principal, statuses: Iterable[str] | None, limit: int,
                  cursor: str | None) -> tuple[list[Generation], str | None]:
        """The caller's jobs, newest first, from its index: up to `limit` of them (with
        `statuses`, those in one of them) after `cursor`, and the cursor of the next page
        (None at the end). At most LIST_SCAN_MAX index entries are looked at per call, so a
        filtered page may be short, even empty, with a cursor. Index entries of jobs that
        have expired are removed."""
        wanted = set(statuses) if statuses else None
        key = jobs_index_key(who.owner)
        at, after = parse_cursor(cursor) if cursor else (None, "")
        found: list[tuple[Job, GenerationSpec, str]] = []
        gone: list[str] = []
        examined, more = 0, False
        while examined < LIST_SCAN_MAX:
            need = (limit - len(found) + 1 if wanted is None or len(found) == limit
                    else LIST_BATCH)
            want = min(need, LIST_SCAN_MAX - examined + 1)
            entries = self._index_page(key, at, after, want)
            jobs = self._fetch_many([member for member, _ in entries])
            for (member, score), job in zip(entries, jobs, strict=True):
                if len(found) == limit or examined == LIST_SCAN_MAX:
                    more = True             # an entry is left: there is a next page
                    break
                examined += 1
                at, after = score, member
                if job is None:
                    gone.append(member)
                    continue
                try:
                    if job.func_name != JOB_FUNC or not who.owns(job.meta.get("owner")):
                        continue
                    status = api_status(job.get_status(refresh=False))
                    if wanted is None or status in wanted:
                        found.append((job, self.spec_of(job), status))
                except Exception:  # a payload that is not ours to decode
                    continue
            if more or len(entries) < want:
                break
        if gone:
            self.redis.zrem(key, *gone)
        ahead = self._positions([(job, spec) for job, spec, status in found
                                 if status == "queued"])
        stored = self.stored_images([(job.id, spec.num_images) for job, spec, status in found
                                     if status in ENDED_WITHOUT_IMAGES])
        views = [self.view(job, spec=spec, ahead=ahead.get(job.id), stored=stored.get(job.id))
                 for job, spec, _ in found]
        return views, (f"{at}.{after}" if more and at is not None else None)

    def _index_page(self, key: str, at: int | None, after: str, n: int
                    ) -> list[tuple[str, int]]:
        """Up to `n` index entries, newest first, strictly after (`at`, `after`) in that
        order (equal scores come in reverse lexicographic order of the job id)."""
        out: list[tuple[str, int]] = []
        offset = 0
        while len(out) < n:
            got = self.redis.zrevrangebyscore(
                key, "+inf" if at is None else at, "-inf", start=offset, num=n,
                withscores=True, score_cast_func=lambda v: int(float(v)))
            offset += len(got)
            for raw, score in got:
                member = raw.decode()
                if at is None or score < at or member < after:
                    out.append((member, score))
            if len(got) < n:
                break
        return out[:n]

    def _fetch_many(self, ids: list[str]) -> list[Job | None]:
        """The jobs (one round-trip); None for one that is gone."""
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hgetall(Job.key_for(job_id))
            raws = p.execute()
        jobs: list[Job | None] = []
        for job_id, raw in zip(ids, raws, strict=True):
            job = None
            if raw:
                job = Job(job_id, connection=self.redis, serializer=SERIALIZER)
                try:
                    job.restore(raw)
                except Exception:  # not a job this API can read
                    job = None
            jobs.append(job)
        return jobs

    def _positions(self, queued: list[tuple[Job, GenerationSpec]]) -> dict[str, int]:
        """`position` of each queued job, all in one round-trip."""
        if not queued:
            return {}
        plan = []
        with self.redis.pipeline(transaction=False) as p:
            for job, spec in queued:
                keys = self.queue_keys(spec.model)
                own = PRIORITIES.index(spec.priority)
                for k in keys[:own]:
                    p.llen(k)
                p.lpos(keys[own], job.id)
                plan.append((job.id, own + 1))
            replies = p.execute()
        out, i = {}, 0
        for job_id, n in plan:
            *higher, pos = replies[i:i + n]
            i += n
            if pos is not None:
                out[job_id] = sum(higher) + pos
        return out


def status_verb(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "canceled": "been canceled"}.get(
        status, status)


# -- the listing index -------------------------------------------------------------------

LIST_SCAN_MAX = 1000      # index entries one listing request looks at, at most
LIST_BATCH = 100          # read at a time when filtering by status
# A listing cursor: the last entry's creation time (µs) and job id.
CURSOR_PATTERN = r"^[0-9]{1,16}\.[A-Za-z0-9_-]{1,64}$"
_CURSOR = re.compile(CURSOR_PATTERN)


def _micros(t: datetime) -> int:
    return round(t.timestamp() * 1_000_000)


def parse_cursor(cursor: str) -> tuple[int, str]:
    if not _CURSOR.match(cursor):
        raise ApiError(422, "invalid_request", "cursor must be a next_cursor from a listing",
                       field="cursor")
    at, _, after = cursor.partition(".")
    return int(at), after
