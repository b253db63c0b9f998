"""`GET /v1/work`: the work waiting per model, what an autoscaler reads (KEDA's
`metrics-api` scaler, the autoscaling simulation): image-steps queued and still running,
workers, the rate one worker clears, seconds of work (contract/work.py). No key needed,
as `/metrics`: it says how busy the service is, nothing of anyone's jobs."""

from __future__ import annotations

import time

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..deps import CatalogDep

router = APIRouter(tags=["operations"])


class ModelWorkOut(BaseModel):
    queued_jobs: int = Field(description="jobs waiting in the model's queues (every "
                                         "priority)")
    queued_image_steps: int = Field(description="their image-steps (a drained job re-queued "
                                                "with its resume state: what it has left)")
    running_image_steps: int = Field(description="image-steps still to compute on workers")
    remaining_image_steps: int = Field(description="queued + running")
    workers: int = Field(description="live workers advertising the model")
    workers_ready: int = Field(description="of those: model loaded, not draining")
    image_steps_per_s: float | None = Field(
        description="what one worker clears per second, measured by the workers (median "
                    "over live ones; the last stored value when none is live; null if never "
                    "measured)")
    seconds_of_work: float = Field(description="remaining_image_steps / image_steps_per_s "
                                               "(0 while the rate is null): worker-seconds "
                                               "of work waiting")
    model_load_s: float | None = Field(description="the workers' measured model load time "
                                                   "(max; null if unknown)")


class WorkSignal(BaseModel):
    models: dict[str, ModelWorkOut]
    time: float = Field(description="when it was read (epoch seconds)")


@router.get("/v1/work", response_model=WorkSignal,
            summary="The work waiting per model (autoscaling signal)")
def work(catalog: CatalogDep) -> WorkSignal:
    now = time.time()
    models = catalog.work(now)        # every Redis's models, past one Redis
    return WorkSignal(models={m: ModelWorkOut(**w.as_dict()) for m, w in models.items()},
                      time=round(now, 3))
