"""The caller's jobs, newest first, in bounded pages, from the caller's listing index (a
sorted set written by the admission script, `app/admission.py`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from redis import Redis

from contract.keys import jobs_index_key
from contract.queueing import Job, fetch_jobs, is_generation, state_of
from contract.spec import GenerationSpec

from .auth import Principal
from .errors import ApiError
from .schemas import Generation
from .views import ENDED_WITHOUT_IMAGES, Views

LIST_SCAN_MAX = 1000      # index entries one listing request looks at, at most
LIST_BATCH = 100          # read at a time when filtering by status
# A listing cursor: the last entry's creation time (µs) and job id.
CURSOR_PATTERN = r"^[0-9]{1,16}\.[A-Za-z0-9_-]{1,64}$"
_CURSOR = re.compile(CURSOR_PATTERN)


def parse_cursor(cursor: str) -> tuple[int, str]:
    if not _CURSOR.match(cursor):
        raise ApiError(422, "invalid_request", "cursor must be a next_cursor from a listing",
                       field="cursor")
    at, _, after = cursor.partition(".")
    return int(at), after


class Listing:
    def __init__(self, redis: Redis, views: Views) -> None:
        self.redis = redis
        self.views = views

    def page(self, who: Principal, statuses: Iterable[str] | None, limit: int,
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
            jobs = fetch_jobs(self.redis, [member for member, _ in entries])
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
                    if not is_generation(job) or not who.owns(job.meta.get("owner")):
                        continue
                    status = state_of(job)
                    if wanted is None or status in wanted:
                        found.append((job, GenerationSpec.model_validate(job.kwargs), status))
                except Exception:  # a payload that is not ours to decode
                    continue
            if more or len(entries) < want:
                break
        if gone:
            self.redis.zrem(key, *gone)
        ahead = self.views.positions([(job, spec) for job, spec, status in found
                                      if status == "queued"])
        stored = self.views.stored_images([(job.id, spec.num_images)
                                           for job, spec, status in found
                                           if status in ENDED_WITHOUT_IMAGES])
        views = [self.views.view(job, spec=spec, ahead=ahead.get(job.id),
                                 stored=stored.get(job.id))
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
