"""`/v1/models`: what live workers serve."""

from __future__ import annotations

from typing import get_args

from fastapi import APIRouter

from contract.limits import Sampler

from ..catalog import Catalog, Served
from ..deps import Caller, CatalogDep
from ..errors import ERROR_RESPONSES, not_found
from ..schemas import ModelCard, ModelList

# The one definition is the contract's Literal: a sampler added there is listed here, and
# the page (which reads this list) offers it without an edit.
SAMPLERS: list[str] = list(get_args(Sampler))

router = APIRouter(prefix="/v1/models", tags=["models"])


def _card(catalog: Catalog, served: Served) -> ModelCard:
    info = served.info
    return ModelCard(name=info.name, image_size=info.image_size, in_channels=info.in_channels,
                     num_timesteps=info.num_timesteps, num_classes=info.num_classes,
                     class_names=list(info.class_names), parameters=info.parameters,
                     workers=served.workers, queued=catalog.queued(info.name))


@router.get("", response_model=ModelList, responses=ERROR_RESPONSES,
            summary="Models served by live workers")
def list_models(_: Caller, catalog: CatalogDep) -> ModelList:
    return ModelList(models=[_card(catalog, s) for s in catalog.served_models().values()],
                     samplers=SAMPLERS)


@router.get("/{name}", response_model=ModelCard, responses=ERROR_RESPONSES,
            summary="One served model")
def get_model(name: str, _: Caller, catalog: CatalogDep) -> ModelCard:
    served = catalog.served_models().get(name)
    if served is None:
        raise not_found(f"model {name!r}")
    return _card(catalog, served)
