"""Ops routes: liveness, readiness (a healthy worker per model) and the Prometheus metrics."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from serving.deps import MetricsDep, PoolDep
from serving.errors import ServiceUnavailable

router = APIRouter(tags=["ops"])
JSON = "application/json"


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


@router.get("/readyz")
async def readyz(pool: PoolDep) -> Response:
    if not pool.ready():
        raise ServiceUnavailable("Not ready: some model has no healthy worker.", code="not_ready")
    return Response(orjson.dumps({"status": "ready", "models": pool.models}), media_type=JSON)


@router.get("/metrics")
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
