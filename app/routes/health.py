"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from ..deps import CatalogDep, Metrics
from ..schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health,
            responses={503: {"model": Health, "description": "not ready"}},
            summary="Readiness: Redis reachable and at least one live worker (none needed "
                    "with DDPM_SERVE_IDLE_MODELS)")
def readyz(catalog: CatalogDep) -> Response:
    checks: dict[str, object] = {}
    try:
        checks = catalog.readiness()
        ready = bool(checks.pop("ready"))
    except RedisError as e:
        checks["redis"] = f"unreachable: {e}"
        ready = False
    body = Health(status="ok" if ready else "unready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(m: Metrics) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
