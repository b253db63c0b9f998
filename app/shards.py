"""Past one Redis: the API's Redis-backed parts once per Redis (a shard), and which shard a
request goes to.

`DDPM_REDIS_MODELS` (model name → Redis URL, contract/redis_connect.py) puts each named
model's queues, streams and results on its own Redis; the others stay on the default one
(`DDPM_REDIS_URL` or Sentinel). A POST goes to its model's shard; what a job id addresses
goes to the shard the id names: ids made on a named Redis begin with its `shard_tag` and
"-" (then a uuid4's hex, as on the default Redis, whose ids carry no tag), so no lookup is
needed and a tag no shard has is a 404. A listing merges the caller's jobs of every shard.
Rate limits and idempotency records live in the admission script's Redis: the model's.

Without the setting there is one shard and every route takes it at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from contract.redis_connect import (
    SHARD_SEP,
    RedisTarget,
    connect,
    connect_async,
    job_id_shard,
    shard_tag,
)

from .admission import Admission, micros
from .auth import Principal
from .catalog import Catalog
from .errors import not_found
from .jobs import JobStore
from .listing import Listing, parse_cursor
from .schemas import Generation
from .settings import ApiSettings
from .streams import longest_block_ms
from .views import Views


@dataclass(frozen=True)
class Shard:
    """One Redis and the parts that read and write it."""

    tag: str                 # "" for the default Redis (its job ids carry none)
    target: RedisTarget
    redis: Redis
    aredis: AsyncRedis
    jobs: JobStore
    views: Views
    admission: Admission
    listing: Listing

    @classmethod
    def open(cls, target: RedisTarget, tag: str, settings: ApiSettings) -> Shard:
        redis = connect(target, health_check_interval=30, socket_connect_timeout=5)
        # Every open stream blocks in XREAD on a connection of its own: the pool must hold
        # them all (redis-py's default of 100 failed the 101st stream with a traceback).
        # Their XREAD BLOCKs last up to longest_block_ms (an idle stream's backoff): the
        # socket timeout must outlast one (redis-py 8 defaults to 5 s, which cut every
        # stream polled for longer).
        block_s = longest_block_ms(settings.stream_poll_ms) / 1000
        aredis = connect_async(target, health_check_interval=30, socket_connect_timeout=5,
                               socket_timeout=block_s + 5,
                               max_connections=settings.max_streams + 64)
        jobs = JobStore(redis, settings, aredis)
        views = Views(redis)
        admission = Admission(redis, aredis, settings, jobs,
                              id_prefix=tag + SHARD_SEP if tag else "")
        return cls(tag, target, redis, aredis, jobs, views, admission, Listing(redis, views))

    async def aclose(self) -> None:
        await self.aredis.aclose()
        self.redis.close()


class Shards:
    """Every shard, the default first, and the routes to them."""

    def __init__(self, settings: ApiSettings) -> None:
        self.default = Shard.open(settings.redis_target(), "", settings)
        self._by_tag: dict[str, Shard] = {}
        self._by_model: dict[str, Shard] = {}
        for model, url in sorted(settings.redis_models.items()):
            if url == settings.redis_url and not settings.redis_sentinels:
                continue                        # named, but on the default Redis
            tag = shard_tag(url)
            if tag not in self._by_tag:
                self._by_tag[tag] = Shard.open(RedisTarget(url=url), tag, settings)
            self._by_model[model] = self._by_tag[tag]
        self.all = [self.default, *self._by_tag.values()]
        self.catalog = Catalog(self.default.redis, settings,
                               redises=[s.redis for s in self.all],
                               route=lambda model: self.by_model(model).redis)
        self.listing = self.default.listing if len(self.all) == 1 else MergedListing(self.all)

    def by_model(self, model: str) -> Shard:
        """The shard holding `model`'s queues: its own Redis, or the default one."""
        return self._by_model.get(model, self.default)

    def by_job(self, job_id: str | None) -> Shard:
        """The shard a job id names (the default one for an id without a tag, or no id);
        404 for a tag no shard has."""
        if not self._by_tag or not job_id:
            return self.default
        tag = job_id_shard(job_id)
        if not tag:
            return self.default
        shard = self._by_tag.get(tag)
        if shard is None:
            raise not_found("generation")
        return shard

    def models_on(self, shard: Shard) -> list[str]:
        """The models the mapping puts on `shard` (for the start-up log)."""
        return sorted(m for m, s in self._by_model.items() if s is shard)

    async def aclose(self) -> None:
        for shard in self.all:
            await shard.aclose()


def _key(view: Generation) -> tuple[int, str]:
    """A listed job's place in the order of every shard's listing index (creation time in
    µs, then job id; both descending)."""
    return micros(view.created_at), view.id


class MergedListing:
    """The caller's jobs of every shard, in one order: each shard's page after the same
    cursor, merged newest first. A shard that stopped early (a full page, or its scan
    bound) is known only down to where it stopped: the merged page ends there, and its
    cursor resumes every shard from that point."""

    def __init__(self, shards: Iterable[Shard]) -> None:
        self.listings = [s.listing for s in shards]

    def page(self, who: Principal, statuses: Iterable[str] | None, limit: int,
             cursor: str | None) -> tuple[list[Generation], str | None]:
        wanted = list(statuses) if statuses else None
        views: list[Generation] = []
        frontier: tuple[int, str] | None = None     # the highest place a shard stopped at
        for listing in self.listings:
            got, more = listing.page(who, wanted, limit, cursor)
            views += got
            if more is not None:
                stop = parse_cursor(more)
                frontier = stop if frontier is None else max(frontier, stop)
        views.sort(key=_key, reverse=True)
        known = [v for v in views if frontier is None or _key(v) >= frontier]
        page = known[:limit]
        if len(known) > limit or (page and len(page) == limit and frontier is not None):
            at, after = _key(page[-1])
            return page, f"{at}.{after}"
        if frontier is not None:
            return page, f"{frontier[0]}.{frontier[1]}"
        return page, None
