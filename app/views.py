"""A job as the API reports it (`Generation`): status, progress, timings, queue position
and the links of what it made; for one job or a page of them, with one round-trip per
kind of read however many jobs."""

from __future__ import annotations

from redis import Redis

from contract import tracing
from contract.keys import image_key
from contract.limits import PRIORITIES
from contract.queueing import Job, failure_message, model_queue_keys, state_of
from contract.spec import GenerationSpec

from .schemas import Generation, Links, Progress

# Statuses of a job that ended before all its images were made: it lists only the ones it
# stored.
ENDED_WITHOUT_IMAGES = ("failed", "canceled")


class Views:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def view(self, job: Job, base: str = "", *, spec: GenerationSpec | None = None,
             ahead: int | None = None, stored: list[int] | None = None) -> Generation:
        """The job as the API reports it; `spec`, `ahead` (its queue position) and `stored`
        (`stored_images`) when the caller knows them already (a fresh submission, a page):
        then no Redis read is needed.

        `links.images` lists the images that exist or will: all of a queued, running or
        succeeded job, only those a canceled or failed job stored before it ended (never a
        URL that will only answer 404); `images` lists the same once the job has ended."""
        spec = spec or GenerationSpec.model_validate(job.kwargs)
        status = state_of(job)
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
            error = failure_message(job) or "the job failed"
        if status != "queued":
            ahead = None
        elif ahead is None:
            ahead = self.positions([(job, spec)]).get(job.id)
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
            error=error, request=spec, trace_id=tracing.trace_id_of(meta.get(tracing.META_FIELD)),
            links=Links(self_=root, events=f"{root}/events", websocket=f"{root}/ws",
                        images=image_urls, grid=f"{root}/grid.png",
                        animation=f"{root}/animation.gif"))

    def stored_images(self, jobs: list[tuple[str, int]]) -> dict[str, list[int]]:
        """The indices of the final images each job (id, num_images) has in Redis, all in
        one round-trip."""
        if not jobs:
            return {}
        with self.redis.pipeline(transaction=False) as p:
            for job_id, n in jobs:
                for i in range(n):
                    p.exists(image_key(job_id, i))
            found = iter(p.execute())
        return {job_id: [i for i in range(n) if next(found)] for job_id, n in jobs}

    def positions(self, queued: list[tuple[Job, GenerationSpec]]) -> dict[str, int]:
        """Jobs ahead of each queued job: everything in its model's higher-priority
        queues, plus its own queue's entries before it; all in one round-trip. A job no
        longer in its queue has none."""
        if not queued:
            return {}
        plan = []
        with self.redis.pipeline(transaction=False) as p:
            for job, spec in queued:
                keys = model_queue_keys(spec.model)
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
