"""`/v1/models`: what live workers serve."""

from __future__ import annotations

from typing import get_args

from fastapi import APIRouter

from contract.limits import Sampler

from ..deps import Caller, Store
from ..errors import ERROR_RESPONSES, not_found
from ..jobs import JobStore, Served
from ..schemas import ModelCard, ModelList

# The one definition is the contract's Literal: a sampler added there is listed here, and
# the page (which reads this list) offers it without an edit.
SAMPLERS: list[str] = list(get_args(Sampler))

router = APIRouter(prefix="/v1/models", tags=["models"])


def _card(store: JobStore, served: Served) -> ModelCard:
    info = served.info
    return ModelCard(name=info.name, image_size=info.image_size, in_channels=info.in_channels,
                     num_timesteps=info.num_timesteps, num_classes=info.num_classes,
                     class_names=list(info.class_names), parameters=info.parameters,
                     workers=served.workers, queued=store.queued(info.name))


@router.get("", response_model=ModelList, responses=ERROR_RESPONSES,
            summary="Models served by live workers")
def list_models(_: Caller, store: Store) -> ModelList:
    return ModelList(models=[_card(store, s) for s in store.served_models().values()],
                     samplers=SAMPLERS)


@router.get("/{name}", response_model=ModelCard, responses=ERROR_RESPONSES,
            summary="One served model")
def get_model(name: str, _: Caller, store: Store) -> ModelCard:
    served = store.served_models().get(name)
    if served is None:
        raise not_found(f"model {name!r}")
    return _card(store, served)
