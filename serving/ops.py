"""Ops routes: liveness, readiness (a healthy worker per model) and the Prometheus metrics.

The metrics name every tenant, with its token volumes and spend: on this (public) port GET /metrics
answers only `Authorization: Bearer <gateway.metrics_token>`, and is an unknown route when no token
is set. The operator's scraper normally reads the separate metrics listener (serving/metrics_listener.py).
"""

from __future__ import annotations

import hmac

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from serving.deps import PoolDep, ServicesDep
from serving.errors import AuthenticationFailed, NotFound, ServiceUnavailable

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
async def prometheus_metrics(request: Request, s: ServicesDep) -> Response:
    if s.metrics_token is None:
        raise NotFound("Unknown route.", code="unknown_route")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), s.metrics_token.encode()
    ):
        raise AuthenticationFailed(
            "GET /metrics needs 'Authorization: Bearer <metrics token>'.", code="invalid_metrics_token"
        )
    return Response(s.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
