"""The metered OpenAI routes, listed once: path -> request schema, endpoint name and model capability.

Served by the completion pipeline (serving/pipeline.py), forwarded to the worker under the same path
(serving/proxy/forward.py), and documented by FastAPI (`router()`: the OpenAPI document keeps both
operations; their endpoints never run, since the pipeline answers every POST to these paths first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import Response

from serving.errors import TokenportError
from serving.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
)


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    schema: type[BaseModel]
    endpoint: str  # the ledger's `endpoint` field
    capability: str  # what the model must offer (serving/openai/capabilities.py)

    @property
    def name(self) -> str:  # the OpenAPI operation (chat_completions_v1_chat_completions_post, ...)
        return self.endpoint.replace(".", "_")


ROUTES: dict[str, Route] = {
    r.path: r
    for r in (
        Route("/v1/chat/completions", ChatCompletionRequest, "chat.completions", "chat"),
        Route("/v1/completions", CompletionRequest, "completions", "completions"),
        Route("/v1/embeddings", EmbeddingRequest, "embeddings", "embeddings"),
        Route("/v1/responses", ResponsesRequest, "responses", "responses"),
    )
}
BY_ENDPOINT: dict[str, Route] = {r.endpoint: r for r in ROUTES.values()}


def _openapi(schema: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": schema.model_json_schema(ref_template="#/components/schemas/{model}")
                }
            },
        }
    }


async def _served_by_the_pipeline() -> Response:
    raise TokenportError("The completion routes are served by serving/pipeline.py, which is not installed.")


def router() -> APIRouter:
    """The completion routes for FastAPI's OpenAPI document only."""
    r = APIRouter()
    for route in ROUTES.values():
        r.add_api_route(
            route.path,
            _served_by_the_pipeline,
            methods=["POST"],
            name=route.name,
            openapi_extra=_openapi(route.schema),
            tags=["openai"],
        )
    return r
