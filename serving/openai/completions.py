"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from serving.openai.protocol import CompletionRequest
from serving.openai.service import OpenAIService

OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


def router(service: OpenAIService) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions", openapi_extra=OPENAPI, tags=["openai"])
    async def completions(request: Request) -> Response:
        return await service.handle(request, CompletionRequest, "completions", "/v1/completions")

    return r
