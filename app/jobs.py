"""A caller's jobs and what they stored: looked up (owner-checked), cancelled, their images,
inputs and events read. RQ stays the source of truth; RQ's layout is read and written only
through `contract.queueing`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from contract.events import Event, EventType
from contract.keys import events_key, image_key, input_key
from contract.queueing import (
    Job,
    NoSuchJob,
    NotCancelable,
    cancel_job,
    fetch_job,
    is_generation,
    job_key,
    reload_job,
    restore_job,
    state_of,
)
from contract.results_store import ResultStore, ResultStoreError, is_pointer
from contract.spec import GenerationSpec

from .auth import Principal
from .errors import ApiError, not_found
from .settings import ApiSettings
from .streams import BATCH, Prefetched, StreamEvent, entries, follow, follow_reads

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def status_verb(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "canceled": "been canceled"}.get(
        status, status)


class JobStore:
    def __init__(self, redis: Redis, settings: ApiSettings,
                 aredis: AsyncRedis | None = None) -> None:
        self.redis = redis
        self.aredis = aredis        # for the routes that run on the event loop
        self.settings = settings
        # DDPM_RESULTS_URL: final images and inputs in object storage, their keys holding
        # the objects' URLs (contract/results_store.py); a key may hold either.
        self.results = ResultStore(
            settings.results_url, public_endpoint=settings.results_public_endpoint
        ) if settings.results_url else None

    # -- look up ----------------------------------------------------------------------

    def get(self, job_id: str, who: Principal) -> Job:
        """The job, if it exists, is a generation, and belongs to the caller; else 404."""
        if not JOB_ID.match(job_id):
            raise not_found("generation")
        try:
            job = fetch_job(self.redis, job_id)
        except NoSuchJob:
            raise not_found("generation") from None
        except RedisError:
            raise                # 503, not a 404 that says the job is gone
        except Exception:      # a foreign job whose payload is not ours to decode
            raise not_found("generation") from None
        return self.owned(job, who)

    async def aget(self, job_id: str, who: Principal) -> Job:
        """`get` on the event loop: the hash read through the async client (RQ's own
        `restore` builds the job, bound to the sync client for what follows)."""
        return (await self._aget_with(job_id, who, None))[0]

    async def aget_image(self, job_id: str, who: Principal, index: int
                         ) -> tuple[Job, bytes | None]:
        """`aget` and what image `index`'s key holds (the PNG or its URL), in one round
        trip: a small job's lookup and its image were two of Redis's ~8 per image."""
        return await self._aget_with(job_id, who, lambda p: p.get(image_key(job_id, index)))

    async def aget_events(self, job_id: str, who: Principal, after: str
                          ) -> tuple[Job, Prefetched]:
        """`aget` and the stream's entries after `after` as they are now (no wait), in one
        round trip: the first read of the follower (`follow(first=…)`)."""
        return await self._aget_with(job_id, who, lambda p: p.xread(
            {events_key(job_id): after}, count=BATCH))

    async def _aget_with(self, job_id: str, who: Principal, read: Callable[[Any], object] | None
                         ) -> tuple[Job, Any]:
        """The job (404 unless it is the caller's generation) and the reply of `read`, a
        command on one of the job's keys queued after the lookup in the same pipeline;
        the reply is only handed out once the lookup says the job is the caller's."""
        if not JOB_ID.match(job_id):
            raise not_found("generation")
        if read is None:
            raw, reply = await self._async.hgetall(job_key(job_id)), None  # RedisError: 503
        else:
            async with self._async.pipeline(transaction=False) as p:
                p.hgetall(job_key(job_id))
                read(p)
                raw, reply = await p.execute()
        if not raw:
            raise not_found("generation")
        try:
            job = restore_job(self.redis, job_id, raw)
        except Exception:      # a hash RQ cannot read is not a generation of ours
            raise not_found("generation") from None
        return self.owned(job, who), reply

    @staticmethod
    def owned(job: Job, who: Principal) -> Job:
        """`job` if it is a generation of the caller's, else 404."""
        if not (is_generation(job) and _owns(who, job)):
            raise not_found("generation")
        return job

    @staticmethod
    def reload(job: Job) -> Job:
        """`job` read again (after a change: a cancel)."""
        return reload_job(job)

    @staticmethod
    def spec_of(job: Job) -> GenerationSpec:
        return GenerationSpec.model_validate(job.kwargs)

    # -- cancel ------------------------------------------------------------------------

    def cancel(self, job: Job) -> None:
        """Cancel a queued or running job; 409 if it has ended already."""
        status = state_of(job, refresh=True)
        if status not in ("queued", "running"):
            raise ApiError(409, "conflict", f"the generation has already {status_verb(status)}")
        try:
            cancel_job(self.redis, job, self.settings.result_ttl)
        except NotCancelable as e:
            raise ApiError(409, "conflict", str(e)) from None
        if status == "queued":
            # No worker has it, so none will announce the cancellation: do it here (a
            # worker that took it at this instant announces too; readers stop at the first).
            key = events_key(job.id)
            with self.redis.pipeline(transaction=False) as p:
                p.xadd(key, Event(EventType.CANCELED, {"message": "canceled"}).to_fields(),
                       maxlen=self.settings.stream_maxlen, approximate=True)
                p.expire(key, self.settings.result_ttl)
                p.execute()

    # -- what a job stored ---------------------------------------------------------------

    def images(self, job: Job, indices: Iterable[int]) -> list[bytes | None]:
        """Final PNGs (None where not stored), in one round-trip (and the store's reads)."""
        keys = [image_key(job.id, i) for i in indices]
        return [self._png(v) for v in self.redis.mget(keys)] if keys else []

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self._apng(await self._async.get(image_key(job_id, index)))

    async def all_images(self, job_id: str, n: int) -> list[bytes | None]:
        found = await self._async.mget([image_key(job_id, i) for i in range(n)])
        return list(await asyncio.gather(*(self._apng(v) for v in found)))

    async def input(self, job_id: str, name: str) -> bytes | None:
        return await self._apng(await self._async.get(input_key(job_id, name)))

    async def image_ref(self, stored: bytes | None) -> bytes | str | None:
        """What `GET …/images/{i}` answers with for what the image's key holds
        (`aget_image`): the PNG, or (stored in object storage,
        DDPM_RESULTS_DELIVERY=redirect) a presigned URL of it; None: not stored."""
        return await self._ref(stored)

    async def input_ref(self, job_id: str, name: str) -> bytes | str | None:
        """`image_ref` of an input image."""
        return await self._ref(await self._async.get(input_key(job_id, name)))

    async def image_url(self, job_id: str, index: int) -> str | None:
        """A presigned URL of a final image kept in object storage (None: it is not)."""
        value = await self._async.get(image_key(job_id, index))
        if value is None or not is_pointer(value):
            return None
        return self._store().presign(self._name(value), self.settings.results_url_ttl)

    async def _ref(self, value: bytes | None) -> bytes | str | None:
        if value is None or not is_pointer(value) or self.settings.results_delivery == "proxy":
            return await self._apng(value)
        return self._store().presign(self._name(value), self.settings.results_url_ttl)

    def _png(self, value: bytes | None) -> bytes | None:
        """A stored value as the PNG: itself, or the object its URL names."""
        if value is None or not is_pointer(value):
            return value
        name = self._name(value)
        try:
            return self._store().get(name)
        except ResultStoreError as e:
            raise ApiError(503, "unavailable", str(e), headers={"Retry-After": "5"}) from None

    async def _apng(self, value: bytes | None) -> bytes | None:
        if value is None or not is_pointer(value):
            return value
        name = self._name(value)
        try:
            return await self._store().aget(name)
        except ResultStoreError as e:
            raise ApiError(503, "unavailable", str(e), headers={"Retry-After": "5"}) from None

    def _name(self, pointer: bytes) -> str:
        """The object a stored URL names, in this API's store (503 for another's: the API
        and the workers disagree on DDPM_RESULTS_URL)."""
        try:
            return self._store().name_of(pointer)
        except ValueError as e:
            raise ApiError(503, "unavailable", str(e)) from None

    def _store(self) -> ResultStore:
        if self.results is None:
            raise ApiError(503, "unavailable", "this result is in object storage and this API "
                           "has no DDPM_RESULTS_URL to reach it")
        return self.results

    def events(self, job: Job) -> list[Event]:
        """Every event the job's stream holds now, oldest first (entries that are not
        events skipped)."""
        out = []
        for _, fields in self.redis.xrange(events_key(job.id)):
            try:
                out.append(Event.from_fields(fields))
            except (KeyError, ValueError):
                continue
        return out

    def follow(self, job_id: str, after: str, *, inline_images: bool = False,
               first: Prefetched = None) -> AsyncIterator[StreamEvent]:
        """The job's events live after id `after`, as SSE and WebSocket clients read them
        (`app/streams.py`); `first`: the entries `aget_events` read already."""
        return follow(self._async, job_id, after, poll_ms=self.settings.stream_poll_ms,
                      inline_images=inline_images, image=self.image, first=first)

    def follow_reads(self, job_id: str, after: str, *, inline_images: bool = False,
                     first: Prefetched = None) -> AsyncIterator[list[StreamEvent]]:
        """`follow`, a list per read of the stream (empty: an idle read)."""
        return follow_reads(self._async, job_id, after,
                            poll_ms=self.settings.stream_poll_ms,
                            inline_images=inline_images, image=self.image, first=first)

    def entries(self, job_id: str, after: str = "0-0"
                ) -> AsyncIterator[tuple[str | None, Event]]:
        """The job's events live after id `after`, decoded (`streams.entries`)."""
        return entries(self._async, job_id, after, poll_ms=self.settings.stream_poll_ms)

    @property
    def _async(self) -> AsyncRedis:
        assert self.aredis is not None, "JobStore made without an async client"
        return self.aredis


def _owns(who: Principal, job: Job) -> bool:
    try:
        return who.owns((job.meta or {}).get("owner"))
    except Exception:      # a payload that is not ours to decode
        return False
