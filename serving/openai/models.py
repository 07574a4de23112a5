"""GET /v1/models and GET /v1/models/{id}: the models the calling tenant may use, with what they
offer and cost (serving/openai/model_cards.py)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from serving.deps import PrincipalDep, ServicesDep
from serving.errors import ModelNotFound
from serving.openai.model_cards import card

JSON = "application/json"


def router(created: int) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models", tags=["openai"])
    async def list_models(principal: PrincipalDep, s: ServicesDep) -> Response:
        catalogue = s.stores.settings.catalogue
        data = [
            card(m, created, catalogue.get(m), principal.tenant, s.stores.prices)
            for m in s.pool.models
            if principal.tenant.may_use(m)
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)

    @r.get("/v1/models/{model_id:path}", tags=["openai"])
    async def retrieve_model(model_id: str, principal: PrincipalDep, s: ServicesDep) -> Response:
        if model_id not in s.pool.models or not principal.tenant.may_use(model_id):
            raise ModelNotFound(
                f"The model '{model_id}' does not exist or you do not have access to it.", param="model"
            )
        body = card(
            model_id, created, s.stores.settings.catalogue.get(model_id), principal.tenant, s.stores.prices
        )
        return Response(orjson.dumps(body), media_type=JSON)

    return r
