"""One batch line through the completion pipeline's own steps (serving/pipeline.py, steps 4-9):
validate -> attribute -> admission (serving/limits/guard.py) -> forward (serving/proxy/forward.py)
-> record (metering/recorder.py, by the forwarder). No HTTP call to the gateway itself.

The line is metered under its own request id (fixed when the batch was validated) and the endpoint
`batch.<route endpoint>` (metering/events.py BATCH_PREFIX), so billing prices it at the batch
discount. Its origin is the tenant's billing country (a batch has no client address of its own).

Outcomes: `Done` (the output or the error file's line) or `PutBack` (nothing ran and nothing was
recorded: rate limited, no healthy worker, the ledger or the limits store down; the line runs later).
A line that reached a worker is never put back: its usage event is written, so it is done.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from metering.events import BATCH_PREFIX
from metering.language import LanguageDetector, prompt_sample
from metering.ledger import LedgerUnavailable
from metering.recorder import RequestMeter
from metering.tokencount import counted_as, prompt_text
from serving.auth import KeyRing
from serving.batches import shapes
from serving.batches.store import LineRow
from serving.errors import InvalidRequest, ModelNotFound, ServiceUnavailable, TokenportError
from serving.limits.errors import RateLimitExceeded
from serving.limits.guard import Guard
from serving.openai.protocol import first_error
from serving.openai.routes import ROUTES
from serving.proxy.forward import Forwarder


@dataclass(frozen=True, slots=True)
class Done:
    ok: bool  # output file (True) or error file (False)
    line: str


@dataclass(frozen=True, slots=True)
class PutBack:
    retry_after_s: float


class Interrupted(Exception):
    """The line's task was cancelled (the gateway is stopping); `recorded`: its usage event is written."""

    def __init__(self, recorded: bool) -> None:
        super().__init__("batch line interrupted")
        self.recorded = recorded


class LineExecutor:
    def __init__(
        self, keyring: KeyRing, guard: Guard, forwarder: Forwarder, language: LanguageDetector | None
    ) -> None:
        self.keyring = keyring
        self.guard = guard
        self.forwarder = forwarder
        self.language = language

    async def run(
        self, tenant_id: str, key_id: str, endpoint_path: str, line: LineRow, retry_s: float
    ) -> Done | PutBack:
        t0 = time.perf_counter()
        rid = line.request_id
        admission = None
        meter: RequestMeter | None = None
        try:
            route = ROUTES.get(endpoint_path)
            if route is None or line.body is None:
                return Done(
                    False,
                    shapes.error_line(
                        line.custom_id,
                        rid,
                        "batch_unrunnable",
                        "This line can no longer run (its endpoint is gone).",
                    ),
                )
            tenant = self.keyring.tenant(tenant_id)
            if tenant is None:  # not in the key cache yet (a new tenant), or gone: try later, expire at worst
                return PutBack(retry_s)
            raw = line.body.encode()
            body = orjson.loads(raw)
            # 4. validate, as the pipeline does
            self.guard.check_shape(body)
            if body.get("stream"):
                raise InvalidRequest("stream is not supported in a batch.", param="stream")
            try:
                route.schema.model_validate(body)
            except ValidationError as exc:
                message, param = first_error(exc)
                raise InvalidRequest(message, param=param or None) from exc
            model: str = body["model"]
            if not tenant.may_use(model) or not self.forwarder.pool.serves(model):
                raise ModelNotFound(
                    f"The model '{model}' does not exist or you do not have access to it.", param="model"
                )
            # 5. attribute: the tenant's country (no client address); the prompt's language
            shaped_as, shaped = counted_as(route.endpoint, body)
            language = self.language.detect(prompt_sample(shaped)) if self.language is not None else None
            # 7. admission: the tenant's caps, rate limits and budget, as for live traffic (a fail-closed
            # ledger that is down puts the line back first, using none of the rate limit)
            await self.forwarder.recorder.ledger.admit()
            admission = await self.guard.admit(tenant, key_id, rid, route.endpoint, body, len(raw))
            meter = RequestMeter(
                request_id=rid,
                tenant_id=tenant.id,
                key_id=key_id,
                model=model,
                endpoint=BATCH_PREFIX + route.endpoint,
                origin_country=tenant.billing_country,
                origin_source="tenant",
                stream=False,
                language=language,
            )
            meter.measure_prompt(prompt_text(shaped_as, shaped))  # its size, never its text
            # 8. forward; 9. record (by the forwarder)
            resp = await self.forwarder.forward(
                meter, body, {}, t0, timeout_s=self.guard.timeout_s(admission)
            )
            return Done(
                True, shapes.response_line(line.custom_id, rid, resp.status_code, orjson.loads(resp.body))
            )
        except BaseException as exc:
            if admission is not None and (meter is None or not meter.recorded):
                self.guard.release(admission)  # no usage event will come to settle the hold
            recorded = meter is not None and meter.recorded
            if isinstance(exc, asyncio.CancelledError):
                raise Interrupted(recorded) from exc
            if not recorded and isinstance(exc, RateLimitExceeded):
                return PutBack(_retry_after(exc, retry_s))
            if not recorded and isinstance(exc, ServiceUnavailable | LedgerUnavailable):
                return PutBack(retry_s)  # no healthy worker, limits store or ledger down: nothing ran
            if isinstance(exc, TokenportError):  # refused (caps, budget, model) or failed at the worker
                return Done(False, shapes.response_line(line.custom_id, rid, exc.status_code, exc.body()))
            raise


def _retry_after(exc: TokenportError, default: float) -> float:
    value = exc.headers.get("retry-after") or exc.headers.get("Retry-After")
    try:
        return max(default, float(value)) if value else default
    except ValueError:
        return default
