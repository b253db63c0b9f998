"""Request and response bodies of the API, as the OpenAPI schema documents them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.contract import GenerationSpec

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

EXAMPLE_REQUEST = {"model": "mnist", "num_images": 4, "sampler": "dpm++2m", "steps": 25,
                   "seed": 42, "snapshot_every": 5, "class_label": 7, "guidance_scale": 2.0}


class GenerationRequest(GenerationSpec):
    """A generation request: the worker's spec plus what only the API acts on."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    webhook: Annotated[str | None, Field(
        max_length=2048, pattern=r"^https?://",
        description="URL POSTed (job id and status) when the job succeeds or fails; its host "
                    "must be on the service's allow-list")] = None

    def spec(self) -> GenerationSpec:
        return GenerationSpec(**self.model_dump(exclude={"webhook"}))


class Progress(BaseModel):
    steps_done: int = Field(description="denoising steps done, summed over the images")
    total_steps: int = Field(description="num_images × steps")
    fraction: float = Field(ge=0, le=1)
    images_done: int
    num_images: int
    steps_per_image: int
    image_steps: list[int] = Field(description="steps done by each image")


class Links(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    events: str
    websocket: str
    images: list[str]
    grid: str
    animation: str


class Generation(BaseModel):
    """A generation job as the API reports it."""

    id: str
    status: Status
    model: str
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = Field(
        None, description="jobs ahead of this one while queued (0: next to run)")
    progress: Progress
    images: list[str] = Field(description="URLs of the final images, once stored")
    error: str | None = None
    request: GenerationSpec
    links: Links


class ModelCard(BaseModel):
    """A model that live workers serve."""

    name: str
    image_size: int
    in_channels: int
    num_timesteps: int
    num_classes: int = 0
    class_names: list[str] = []
    parameters: int = 0
    workers: int = Field(description="live workers serving it")
    queued: int = Field(description="jobs waiting in its queues")


class ModelList(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unready"]
    checks: dict[str, Any] = {}
