"""GET and DELETE /v1/responses/{response_id}: the calling tenant's stored Responses API objects
(serving/response_store.py says what is stored, when, and for how long)."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from serving.deps import PrincipalDep, ServicesDep
from serving.errors import NotFound
from serving.response_store import ResponseStore

JSON = "application/json"
router = APIRouter()


def _missing(response_id: str) -> NotFound:
    return NotFound(
        f"Response with id '{response_id}' not found. Responses are kept only when the organization's "
        "content logging is on and the request did not set store: false.",
        param="response_id",
    )


@router.get("/v1/responses/{response_id}", tags=["openai"])
async def retrieve_response(response_id: str, principal: PrincipalDep, s: ServicesDep) -> Response:
    found = await asyncio.to_thread(ResponseStore(s.stores.engine).get, principal.tenant.id, response_id)
    if found is None:
        raise _missing(response_id)
    return Response(orjson.dumps(found), media_type=JSON)


@router.delete("/v1/responses/{response_id}", tags=["openai"])
async def delete_response(response_id: str, principal: PrincipalDep, s: ServicesDep) -> Response:
    if not await asyncio.to_thread(ResponseStore(s.stores.engine).delete, principal.tenant.id, response_id):
        raise _missing(response_id)
    body = {"id": response_id, "object": "response", "deleted": True}
    return Response(orjson.dumps(body), media_type=JSON)
