"""The completion pipeline: every metered OpenAI route (chat, completions, embeddings, responses), in
one place.

A plain ASGI app, the outermost middleware. `_complete` reads top to bottom in the order a request
goes through the gateway:

 1. request id      `req_<32 hex>`, the ledger's id and the `X-Request-Id` of the answer
 2. auth            the API key, before the body (an unknown caller never makes the gateway hold one)
 3. body            read under `gateway.max_body_bytes` (413) and `gateway.body_timeout_s` (408)
 4. parse/validate  JSON object, shape limits, the route's schema, a model the tenant may use that
                    serves the route (a chat model no embeddings, an embedding model no chat)
 5. attribute       origin country (metering/geo.py) and prompt language (metering/language.py); a
                    routed model name (`auto`) becomes the best model for that language
                    (serving/proxy/language_routing.py)
 6. idempotency     an `Idempotency-Key` claims its key, or replays the stored answer (serving/idempotency.py)
 7. admission       caps, rate limits and the budget hold (serving/limits/guard.py); 429 when over
 8. forward/relay   to a healthy worker (serving/proxy/forward.py; a stream goes through the relay)
 9. record          the one usage event, written by the forwarder or the relay (metering/recorder.py);
                    a request that ends without one releases its hold here
10. respond         two plain `send`s for a whole answer, the relay's sends for a stream

Every error on the way becomes a response in OpenAI's shape through `serving.errors.render`. Every
other request (admin, tenant and ops routes, the OpenAPI document) goes on to the FastAPI app, with
its request id and response counting done here as well.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering.geo import InvalidCountry, OriginResolver
from metering.language import LanguageDetector, prompt_sample
from metering.metrics import Metrics
from metering.recorder import RequestMeter
from metering.tenants import Tenant
from metering.tokencount import counted_as, prompt_text
from serving.auth import KeyRing
from serving.errors import InvalidOriginCountry, InvalidRequest, ModelNotFound, TokenportError, render
from serving.idempotency import HEADER as IDEMPOTENCY_KEY
from serving.idempotency import Claim, Idempotency, Replay
from serving.limits.guard import Guard
from serving.limits.http_timeouts import ClientGone, read_body
from serving.openai.protocol import first_error, parse_json_object
from serving.openai.routes import ROUTES, Route
from serving.proxy.forward import Forwarder
from serving.proxy.language_routing import HEADER as ROUTED_MODEL
from serving.proxy.language_routing import LanguageRouter
from serving.proxy.relay import RelayResponse

REQUEST_ID = "tokenport.request_id"  # scope key: the request's id, for the FastAPI routes too


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()  # as random as uuid4, without building a UUID object


class Pipeline:
    """The outermost ASGI app: the metered routes (serving/openai/routes.py) here, the rest to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keyring: KeyRing,
        origin: OriginResolver,
        language: LanguageDetector | None,
        idempotency: Idempotency,
        guard: Guard,
        forwarder: Forwarder,
        metrics: Metrics,
        max_body_bytes: int,
        body_timeout_s: float,
        routing: LanguageRouter | None = None,
        capabilities: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.origin = origin
        self.language = language
        self.idempotency = idempotency
        self.guard = guard
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.routing = routing
        self.capabilities = capabilities  # model -> what it serves (serving/openai/capabilities.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = ROUTES.get(scope["path"]) if scope["method"] == "POST" else None
        if route is None:
            await self._other(scope, receive, send)
        else:
            await self._complete(route, scope, receive, send)

    async def _complete(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        # 1. request id
        request_id = scope[REQUEST_ID] = new_request_id()
        headers: dict[str, str] = {}
        for name, value in reversed(scope["headers"]):  # the first of repeated headers wins, as in Starlette
            headers[name.decode("latin-1")] = value.decode("latin-1")
        claim: Claim | None = None
        meter: RequestMeter | None = None
        resp: Response | None = None
        try:
            # 2. auth, before the body
            principal = await self.keyring.authenticate(headers.get("authorization"))
            # 3. body
            raw = await read_body(
                receive, headers, max_bytes=self.max_body_bytes, timeout_s=self.body_timeout_s
            )
            # 4. parse/validate
            body = self._validated(route, raw)
            model: str = body["model"]
            tenant = principal.tenant
            routed = self._check_model(route, tenant, model)
            # 5. attribute
            country, source = self._origin(scope, headers, tenant)
            # an embeddings input or a Responses input read as the prompt or messages it becomes
            shaped_as, shaped = counted_as(route.endpoint, body)
            language = self.language.detect(prompt_sample(shaped)) if self.language is not None else None
            reply_headers: dict[str, str] = {}
            if routed and self.routing is not None:  # the best served model for the language
                model = reply_headers[ROUTED_MODEL] = self.routing.resolve(body, language, tenant.may_use)
            # 6. idempotency
            key = headers.get(IDEMPOTENCY_KEY)
            if key is not None:
                got = await self.idempotency.claim(key, tenant.id, request_id, route.endpoint, body)
                if isinstance(got, Replay):  # a retry of a finished request gets the first answer, unbilled
                    await self._replay(got, route, send)
                    return
                claim = got
                send = claim.capture(send)
            # 7. admission (a fail-closed ledger that is down refuses first: its 503 uses no rate limit)
            await self.forwarder.recorder.ledger.admit()
            admission = await self.guard.admit(
                tenant, principal.key_id, request_id, route.endpoint, body, len(raw)
            )
            meter = RequestMeter(
                request_id=request_id,
                tenant_id=tenant.id,
                key_id=principal.key_id,
                model=model,
                endpoint=route.endpoint,
                origin_country=country,
                origin_source=source,
                stream=bool(body.get("stream")),
                language=language,
            )
            meter.measure_prompt(prompt_text(shaped_as, shaped))  # its size, never its text
            # 8. forward or relay; 9. record (by the forwarder, or by the relay when the stream ends)
            try:
                resp = await self.forwarder.forward(
                    meter,
                    body,
                    {**admission.headers, **reply_headers},
                    t0,
                    timeout_s=self.guard.timeout_s(admission),
                    session=headers.get(self.forwarder.session_header or ""),
                )
            except BaseException as exc:
                if not meter.recorded:  # no usage event will come to settle the hold
                    self.guard.release(admission)
                if isinstance(exc, TokenportError):
                    for k, v in admission.headers.items():
                        exc.headers.setdefault(k, v)
                raise
            resp = self.guard.log_content(resp, meter, raw)
        except ClientGone:
            return  # the client left before its request was whole: nothing to run, no one to answer
        except Exception as exc:  # noqa: BLE001  every error in OpenAI's shape; render logs an unexpected one
            _abandon(resp)
            status, err_headers, payload = render(exc)
            resp = Response(payload, status, headers=err_headers)
        except BaseException:  # cancelled mid-way (the server's shutdown deadline): no answer goes out
            _abandon(resp)
            if claim is not None:  # consume or release the key now, not after its stale time
                self.idempotency.finish(claim, meter)
            raise
        # 10. respond
        try:
            resp.raw_headers.append((b"x-request-id", request_id.encode()))
            self.metrics.child(self.metrics.responses, route.path, str(resp.status_code)).inc()
            if type(resp) is Response:  # a whole body: two sends, no Starlette call machinery
                await send(
                    {"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers}
                )
                await send({"type": "http.response.body", "body": resp.body})
            else:  # a stream (serving/proxy/relay.py)
                await resp(scope, receive, send)
        finally:
            _abandon(resp)  # a stream that never started (an error before it) is still metered
            if claim is not None:  # store the answer, consume the key, or release it
                self.idempotency.finish(claim, meter)

    def _validated(self, route: Route, raw: bytes) -> dict[str, Any]:
        """Step 4: the body as a JSON object within the shape limits, valid for the route's schema."""
        body = parse_json_object(raw)
        self.guard.check_shape(body)
        try:
            route.schema.model_validate(body)
        except ValidationError as exc:
            message, param = first_error(exc)
            raise InvalidRequest(message, param=param or None) from exc
        return body

    def _origin(self, scope: Scope, headers: dict[str, str], tenant: Tenant) -> tuple[str, str]:
        """Step 5: the origin country and what decided it (header, GeoIP, the tenant's country)."""
        client = scope.get("client")
        try:
            return self.origin.resolve(headers, tenant.billing_country, client[0] if client else None)
        except InvalidCountry as exc:
            raise InvalidOriginCountry(str(exc), param=self.origin.header) from exc

    def _check_model(self, route: Route, tenant: Tenant, model: str) -> bool:
        """Step 4: a model the tenant may use that serves the route; True for a routed name (`auto`),
        resolved to a model after the language is known (step 5)."""
        routed = self.routing is not None and self.routing.routes(model)
        if not routed and (not tenant.may_use(model) or not self.forwarder.pool.serves(model)):
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.", param="model"
            )
        if self.capabilities is not None and route.capability not in self.capabilities(model):
            raise InvalidRequest(
                f"The model '{model}' does not support {route.path}.",
                param="model",
                code="model_not_supported",
            )
        return routed

    async def _replay(self, replay: Replay, route: Route, send: Send) -> None:
        # X-Request-Id: the id of the metered request it replays
        headers = [*replay.raw_headers(), (b"x-request-id", replay.request_id.encode())]
        self.metrics.child(self.metrics.responses, route.path, str(replay.status)).inc()
        await send({"type": "http.response.start", "status": replay.status, "headers": headers})
        await send({"type": "http.response.body", "body": replay.body})

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A FastAPI route: its request id and X-Request-Id, and the response counted by route."""
        request_id = scope[REQUEST_ID] = new_request_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                path = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.child(self.metrics.responses, path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_id)


def _abandon(resp: Response | None) -> None:
    """A stream the worker already produces but that will not be (or was not) relayed to the end: close
    the worker's connection, meter what it produced and end its flight (StreamRelay.abandon; a no-op once
    the stream recorded its usage)."""
    if isinstance(resp, RelayResponse):
        resp.relay.abandon()
