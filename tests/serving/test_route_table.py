"""The metered routes are listed once (serving/openai/routes.py): exactly those are served by the
pipeline (serving/pipeline.py), forwarded to the worker under the same path, and documented by FastAPI."""

from __future__ import annotations

from fastapi.routing import APIRoute

from serving.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
)
from serving.openai.routes import BY_ENDPOINT, ROUTES
from serving.pipeline import Pipeline
from tests.conftest import Gateway, TenantKey
from tests.fakes import FakeWorker
from tests.serving.helpers import auth


def test_the_table_is_the_four_metered_routes() -> None:
    assert {p: (r.schema, r.endpoint, r.capability) for p, r in ROUTES.items()} == {
        "/v1/chat/completions": (ChatCompletionRequest, "chat.completions", "chat"),
        "/v1/completions": (CompletionRequest, "completions", "completions"),
        "/v1/embeddings": (EmbeddingRequest, "embeddings", "embeddings"),
        "/v1/responses": (ResponsesRequest, "responses", "responses"),
    }
    assert {e: r.path for e, r in BY_ENDPOINT.items()} == {
        "chat.completions": "/v1/chat/completions",
        "completions": "/v1/completions",
        "embeddings": "/v1/embeddings",
        "responses": "/v1/responses",
    }


def test_fastapi_has_no_other_openai_post_route_and_the_pipeline_is_outermost(gateway: Gateway) -> None:
    posts = {
        r.path
        for r in gateway.app.routes
        if isinstance(r, APIRoute)
        and "POST" in r.methods
        and r.path.startswith("/v1/")
        and "openai" in r.tags
    }
    assert posts == set(ROUTES)
    outermost: object = gateway.app.user_middleware[0].cls  # add_middleware: the last added runs first
    assert outermost is Pipeline


def test_fastapi_documents_each_route_with_its_schema(gateway: Gateway) -> None:
    doc = gateway.app.openapi()
    for path, route in ROUTES.items():
        op = doc["paths"][path]["post"]
        assert op["operationId"] == f"{route.name}_{path.strip('/').replace('/', '_')}_post"
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["title"] == route.schema.__name__
        assert set(schema["properties"]) == set(route.schema.model_fields)


async def test_every_route_is_served_by_the_pipeline_and_forwarded_under_its_path(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    bodies = {
        "/v1/chat/completions": {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "hi"}],
        },
        "/v1/completions": {"model": "smollm2-135m-instruct", "prompt": "hi"},
        "/v1/responses": {"model": "smollm2-135m-instruct", "input": "hi"},
    }
    # embeddings need a `kind: embedding` model: tests/serving/test_surface_embeddings.py
    assert set(bodies) | {"/v1/embeddings"} == set(ROUTES)
    for path, body in bodies.items():
        r = await gateway.http.post(path, json=body, headers=auth(tenant.api_key))
        assert r.status_code == 200, r.text  # FastAPI's own endpoint for these paths answers 500
        event = (await gateway.wait_event(r.headers["x-request-id"])).event
        assert event.endpoint == ROUTES[path].endpoint
    assert [req.path for req in worker.completion_requests()] == list(bodies)
