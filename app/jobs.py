"""Jobs as the API sees them: submit (with idempotency), look up (owner-checked), report,
cancel. RQ stays the source of truth; this module only reads and writes through it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue

from worker.client import enqueue, fetch_job
from worker.contract import (
    JOB_FUNC,
    PREFIX,
    PRIORITIES,
    SERIALIZER,
    Event,
    EventType,
    GenerationSpec,
    ModelInfo,
    events_key,
    image_key,
    live_worker_keys,
    queue_name,
)

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


def api_status(rq_status: JobStatus | str | None) -> str:
    if rq_status is None:
        return "canceled"
    return _STATUS.get(JobStatus(rq_status), "queued")


@dataclass(frozen=True)
class Served:
    """A model and how many live workers advertise it."""

    info: ModelInfo
    workers: int


class JobStore:
    def __init__(self, redis: Redis, settings: ApiSettings) -> None:
        self.redis = redis
        self.settings = settings

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
        return dict(sorted(seen.items()))

    def queue(self, model: str, priority: str) -> Queue:
        return Queue(queue_name(model, priority), connection=self.redis,  # type: ignore[arg-type]
                     serializer=SERIALIZER)

    def queued(self, model: str) -> int:
        with self.redis.pipeline(transaction=False) as p:
            for prio in PRIORITIES:
                p.llen(self.queue(model, prio).key)
            return sum(p.execute())

    # -- submit ----------------------------------------------------------------------

    def submit(self, req: GenerationRequest, who: Principal,
               idempotency_key: str | None) -> tuple[Job, bool]:
        """Enqueue `req` (already checked against the served models and the limits).

        Returns the job and whether it is an earlier job replayed for the same
        Idempotency-Key and body.
        """
        spec = req.spec()
        job_id = uuid.uuid4().hex
        idem = None
        if idempotency_key is not None:
            idem = self._idem_key(who, idempotency_key)
            body = self._body_hash(req)
            record = json.dumps({"job": job_id, "body": body})
            if not self.redis.set(idem, record, nx=True, ex=self.settings.idempotency_ttl):
                return self._replay(idem, body, who), True
        try:
            job = enqueue(self.redis, spec, job_id=job_id, result_ttl=self.settings.result_ttl,
                          retries=self.settings.job_retries,
                          timeout=self.settings.job_timeout,
                          meta={"owner": who.owner}, webhook=req.webhook)
        except Exception:
            if idem:
                self.redis.delete(idem)
            raise
        return job, False

    def seen(self, req: GenerationRequest, who: Principal, key: str) -> Job | None:
        """The job an earlier request with this Idempotency-Key created, if any (422 if
        that request had another body)."""
        idem = self._idem_key(who, key)
        if not self.redis.exists(idem):
            return None
        return self._replay(idem, self._body_hash(req), who)

    def _idem_key(self, who: Principal, key: str) -> str:
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise ApiError(422, "invalid_request", "Idempotency-Key must be 1 to "
                           f"{MAX_IDEMPOTENCY_KEY} printable characters",
                           field="Idempotency-Key")
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{PREFIX}:idem:{who.owner}:{digest}"

    @staticmethod
    def _body_hash(req: GenerationRequest) -> str:
        """The request as sent (unset fields stay unset: a random default seed must not
        make two identical requests differ)."""
        body = json.dumps(req.model_dump(mode="json", exclude_unset=True), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def _replay(self, idem: str, body: str, who: Principal) -> Job:
        raw = self.redis.get(idem)
        record = json.loads(raw) if raw else {}
        if record.get("body") != body:
            raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used "
                           "with a different request body", field="Idempotency-Key")
        try:
            return self.get(record["job"], who)
        except ApiError:
            # The first request holding this key is still enqueueing.
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
        if job.func_name != JOB_FUNC or not who.owns(job.meta.get("owner")):
            raise not_found("generation")
        return job

    @staticmethod
    def spec_of(job: Job) -> GenerationSpec:
        return GenerationSpec.model_validate(job.kwargs)

    def view(self, job: Job, base: str = "") -> Generation:
        spec = self.spec_of(job)
        status = api_status(job.get_status(refresh=False))
        meta = job.meta or {}
        n, steps = spec.num_images, spec.steps
        if status == "succeeded":
            image_steps, images_done = [steps] * n, n
        else:
            image_steps = list(meta.get("image_steps") or [0] * n)
            images_done = int(meta.get("images_done", 0))
        done = sum(image_steps)
        root = f"{base}/v1/generations/{job.id}"
        image_urls = [f"{root}/images/{i}" for i in range(n)]
        error = None
        if status == "failed":
            result = job.latest_result()
            error = (result.exc_string if result and result.exc_string else None) or \
                "the job failed"
        return Generation(
            id=job.id, status=status, model=spec.model,  # type: ignore[arg-type]
            created_at=job.created_at, started_at=job.started_at,
            finished_at=job.ended_at if status in ("succeeded", "failed", "canceled") else None,
            queue_position=self.position(job, spec) if status == "queued" else None,
            progress=Progress(steps_done=done, total_steps=spec.total_steps,
                              fraction=round(done / spec.total_steps, 4),
                              images_done=images_done, num_images=n, steps_per_image=steps,
                              image_steps=image_steps),
            images=image_urls if status == "succeeded" else [],
            error=error, request=spec,
            links=Links(self_=root, events=f"{root}/events", websocket=f"{root}/ws",
                        images=image_urls, grid=f"{root}/grid.png",
                        animation=f"{root}/animation.gif"))

    def position(self, job: Job, spec: GenerationSpec) -> int | None:
        """Jobs ahead: everything in the model's higher-priority queues, plus this queue's
        entries before the job."""
        ahead = 0
        for prio in PRIORITIES:
            q = self.queue(spec.model, prio)
            if prio == spec.priority:
                pos = q.get_job_position(job.id)
                return None if pos is None else ahead + pos
            ahead += q.count
        return None

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
        # RQ gives a canceled job's hash no TTL: it would stay forever.
        self.redis.expire(job.key, self.settings.result_ttl)
        if status == "queued":
            # No worker has it, so none will announce the cancellation: do it here (a
            # worker that took it at this instant announces too; readers stop at the first).
            key = events_key(job.id)
            with self.redis.pipeline(transaction=False) as p:
                p.xadd(key, Event(EventType.CANCELED, {"message": "canceled"}).to_fields(),
                       maxlen=1000, approximate=True)
                p.expire(key, self.settings.result_ttl)
                p.execute()

    def fetch_images(self, job: Job, indices: Iterable[int]) -> list[bytes | None]:
        keys = [image_key(job.id, i) for i in indices]
        return list(self.redis.mget(keys)) if keys else []


def status_verb(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "canceled": "been canceled"}.get(
        status, status)
