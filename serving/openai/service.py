"""The request path shared by the OpenAI endpoints: auth -> parse -> validate -> attribute -> forward."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from metering.geo import InvalidCountry, OriginResolver
from metering.language import LanguageDetector, prompt_sample
from metering.recorder import RequestMeter
from serving.auth import KeyRing, Principal
from serving.errors import InvalidOriginCountry, InvalidRequest, ModelNotFound
from serving.idempotency import METER_SCOPE, Idempotency
from serving.limits.guard import Guard
from serving.openai.protocol import first_error
from serving.proxy.forward import Forwarder


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()  # as random as uuid4, without building a UUID object


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in exc.msg or "surrogate" in exc.msg:
            raise InvalidRequest("The request body is not valid UTF-8 JSON (invalid bytes or a lone surrogate).",
                                 code="invalid_utf8") from exc
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


class OpenAIService:
    idempotency: Idempotency | None = None  # Idempotency-Key claims and replays (set by create_app)

    def __init__(self, keyring: KeyRing, forwarder: Forwarder, origin: OriginResolver,
                 language: LanguageDetector | None, guard: Guard | None = None) -> None:
        self.keyring = keyring
        self.guard = guard  # limits, budgets, caps, hostile-input checks (serving/limits/guard.py)
        self.forwarder = forwarder
        self.origin = origin
        self.language = language

    async def handle(self, request: Request, schema: type[BaseModel], endpoint: str, path: str) -> Response:
        """The FastAPI route's entry (requests with an Idempotency-Key, and the OpenAPI document):
        reads the body, then the same path as the ASGI front (serving/front.py)."""
        t0 = time.perf_counter()
        request.scope.setdefault("tokenport.request_id", new_request_id())
        principal = await self.keyring.authenticate(request.headers.get("authorization"))  # before the body
        raw = await request.body()  # size cap and deadline: BodyGuardMiddleware, on this path
        return await self.process(request.scope, request.headers, principal, raw, schema, endpoint, path, t0,
                                  request=request)

    async def process(self, scope: Scope, headers: Mapping[str, str], principal: Principal, raw: bytes,
                      schema: type[BaseModel], endpoint: str, path: str, t0: float, *,
                      request: Request | None = None) -> Response:
        """parse -> validate -> attribute -> admit -> forward, for a request already authenticated
        (before its body was read: an unknown caller never makes the gateway hold a body) and read.
        `request` is given only by the FastAPI route (an Idempotency-Key claim needs it)."""
        request_id: str = scope["tokenport.request_id"]
        body = parse_json_object(raw)
        if self.guard is not None:
            self.guard.check_shape(body)
        try:
            schema.model_validate(body)
        except ValidationError as exc:
            message, param = first_error(exc)
            raise InvalidRequest(message, param=param or None) from exc
        model: str = body["model"]
        if not principal.tenant.may_use(model) or model not in self.forwarder.pool.models:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                                param="model")
        client = scope.get("client")
        try:
            country, source = self.origin.resolve(headers, principal.tenant.billing_country,
                                                  client[0] if client else None)
        except InvalidCountry as exc:
            raise InvalidOriginCountry(str(exc), param=self.origin.header) from exc
        language = self.language.detect(prompt_sample(body)) if self.language is not None else None
        if self.idempotency is not None and request is not None:
            # a retry of a finished request gets the first answer, unbilled
            replay = await self.idempotency.claim(request, principal.tenant.id, endpoint, body)
            if replay is not None:
                return replay
        admission = (None if self.guard is None else await self.guard.admit(
            principal.tenant, principal.key_id, request_id, endpoint, body, len(raw)))  # may raise 429
        meter = RequestMeter(
            request_id=request_id, tenant_id=principal.tenant.id, key_id=principal.key_id, model=model,
            endpoint=endpoint, origin_country=country, origin_source=source, stream=bool(body.get("stream")),
            language=language,
        )
        scope[METER_SCOPE] = meter  # what the request was billed (for its Idempotency-Key)
        if self.guard is None or admission is None:
            return await self.forwarder.forward(meter, path, body, {}, t0)
        return await self.guard.run(admission, meter, raw, lambda headers, timeout_s: self.forwarder.forward(
            meter, path, body, headers, t0, timeout_s=timeout_s))
