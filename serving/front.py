"""The ASGI front: serves the two completion routes without FastAPI's routing and middleware stack.

`POST /v1/chat/completions` and `POST /v1/completions` are every request a tenant pays for, so they
take the shortest path: this module reads the body (with the body deadline and size cap of
BodyGuardMiddleware), calls `OpenAIService.process`, adds `X-Request-Id`, counts the response and
renders errors in OpenAI's shape, all with plain ASGI calls. Everything else (admin, usage, /metrics,
the OpenAPI document) and completion requests that carry an `Idempotency-Key` (whose claim and replay
live in IdempotencyMiddleware) fall through to the FastAPI app, which serves the same routes with the
same service. The profile in bench/results/ measured FastAPI's routing, dependency solving, exception
middlewares and the wrappers around `send` at 100-165 µs per request, a quarter of the gateway's CPU.
"""

from __future__ import annotations

import logging
import time

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from metering.ledger import LedgerUnavailable
from metering.metrics import Metrics
from serving.errors import ServiceUnavailable, TokenportError
from serving.idempotency import HEADER as IDEMPOTENCY_HEADER
from serving.limits.http_timeouts import ClientGone, read_body
from serving.openai.protocol import ChatCompletionRequest, CompletionRequest
from serving.openai.service import OpenAIService, new_request_id

log = logging.getLogger("tokenport.gateway")

ROUTES: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "chat.completions"),
    "/v1/completions": (CompletionRequest, "completions"),
}
_IDEMPOTENCY = IDEMPOTENCY_HEADER.lower().encode()


def ledger_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The usage ledger is unavailable, so requests are refused (metering.fail_closed); "
                              "retry shortly.", code="ledger_unavailable")


def error_response(exc: TokenportError) -> Response:
    return Response(exc.body_bytes(), exc.status_code, headers=exc.headers, media_type="application/json")


class Front:
    """The outermost ASGI app: the completion routes here, the rest to `app` (FastAPI)."""

    def __init__(self, app: ASGIApp, service: OpenAIService, metrics: Metrics, *, max_body_bytes: int,
                 body_timeout_s: float) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in reversed(scope["headers"]):  # the first of repeated headers wins, as in Starlette
            if name == _IDEMPOTENCY:
                await self.app(scope, receive, send)
                return
            headers[name.decode("latin-1")] = value.decode("latin-1")
        t0 = time.perf_counter()
        request_id = scope["tokenport.request_id"] = new_request_id()
        path = scope["path"]
        try:
            principal = await self.service.keyring.authenticate(headers.get("authorization"))  # before the body
            raw = await read_body(receive, headers, max_bytes=self.max_body_bytes, timeout_s=self.body_timeout_s)
            schema, endpoint = route
            resp = await self.service.process(scope, headers, principal, raw, schema, endpoint, path, t0)
        except ClientGone:
            return  # the client left before its request was whole: nothing to run, no one to answer
        except TokenportError as exc:
            resp = error_response(exc)
        except LedgerUnavailable:
            resp = error_response(ledger_unavailable())
        except Exception as exc:  # the client gets a 500 in OpenAI's shape, never a bare one
            log.exception("unexpected error", exc_info=exc)
            resp = error_response(TokenportError("The gateway had an internal error."))
        resp.raw_headers.append((b"x-request-id", request_id.encode()))
        self.metrics.child(self.metrics.responses, path, str(resp.status_code)).inc()
        if type(resp) is Response:  # a whole body: two sends, no Starlette call machinery
            await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
            await send({"type": "http.response.body", "body": resp.body})
        else:  # a stream (serving/proxy/relay.py) or another Response type
            await resp(scope, receive, send)
