"""GET /v1/models: the models the calling tenant may use."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from serving.auth import KeyRing
from serving.proxy.pool import WorkerPool


def router(keyring: KeyRing, pool: WorkerPool, created: int) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models", tags=["openai"])
    async def list_models(request: Request) -> Response:
        principal = await keyring.authenticate(request.headers.get("authorization"))
        data = [{"id": m, "object": "model", "created": created, "owned_by": "tokenport"}
                for m in pool.models if principal.tenant.may_use(m)]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    return r
