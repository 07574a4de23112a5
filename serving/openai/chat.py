"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from serving.openai.protocol import ChatCompletionRequest
from serving.openai.service import OpenAIService

OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


def router(service: OpenAIService) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions", openapi_extra=OPENAPI, tags=["openai"])
    async def chat_completions(request: Request) -> Response:
        return await service.handle(request, ChatCompletionRequest, "chat.completions", "/v1/chat/completions")

    return r
