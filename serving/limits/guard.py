"""The request path's guardrails, in the order they run (serving/pipeline.py calls them):

1. check_shape: JSON nesting depth, number of values and of keys per object (400 invalid_json_shape);
2. admit: one token limit (`one_token_limit`: the smaller of max_tokens and max_completion_tokens,
   forwarded as max_tokens alone), the tenant's caps (max_tokens 400, prompt length 400
   context_length_exceeded), the worst case of the request (prompt upper bound + n x max_tokens,
   max_tokens capped by the tenant's maximum and injected when the client sent none), then the
   Limiter's reservation (429);
3. around the forward: the tenant's request timeout (`timeout_s`), `release` of the hold when the
   request ends before any usage event, `log_content` when the tenant turned content logging on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response

from metering.recorder import RequestMeter
from metering.tenants import Tenant
from serving.content_log import ContentLogger
from serving.limits.errors import ContextLengthExceeded, MaxTokensExceeded, RequestShapeError
from serving.limits.limiter import Admission, Limiter
from serving.limits.tokens import PromptCounter

LIMIT_FIELD = {"responses": "max_output_tokens"}  # an endpoint's completion-token limit, if not max_tokens
PROMPT_FIELD = {
    "chat.completions": "messages",
    "completions": "prompt",
    "embeddings": "input",
    "responses": "input",
}


class Guard:
    def __init__(
        self,
        limiter: Limiter,
        counter: PromptCounter,
        context_length: Callable[[str], int],
        content: ContentLogger | None = None,
        *,
        max_depth: int = 32,
        max_values: int = 100_000,
        max_keys: int = 1024,
    ) -> None:
        self.limiter = limiter
        self.counter = counter
        self.context_length = context_length
        self.content = content
        self.max_depth = max_depth
        self.max_values = max_values
        self.max_keys = max_keys

    def check_shape(self, body: dict[str, Any]) -> None:
        """Refuse bodies nested too deep or with too many values, before any model sees them."""
        stack: list[tuple[Any, int, str]] = [(body, 1, "")]
        values = 0
        while stack:
            obj, depth, path = stack.pop()
            if depth > self.max_depth:
                raise RequestShapeError(
                    f"The request body is nested more than {self.max_depth} levels deep.", param=path or None
                )
            items: Any
            if isinstance(obj, dict):
                if len(obj) > self.max_keys:
                    raise RequestShapeError(
                        f"An object in the request body has more than {self.max_keys} fields.",
                        param=path or None,
                    )
                items = obj.items()
            else:
                items = enumerate(obj)
            for k, v in items:
                values += 1
                if isinstance(v, dict | list):
                    stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))
            if values > self.max_values:
                raise RequestShapeError(f"The request body has more than {self.max_values} JSON values.")

    async def admit(
        self, tenant: Tenant, key_id: str, request_id: str, endpoint: str, body: dict[str, Any], size: int
    ) -> Admission:
        model: str = body["model"]
        eff = self.limiter.effective(tenant.id, key_id)
        if (
            endpoint == "responses"
        ):  # nothing kept on the worker: the gateway stores (serving/response_store.py)
            body["store"] = False
        limit_field = LIMIT_FIELD.get(endpoint, "max_tokens")
        if endpoint == "embeddings":
            field, requested = "max_tokens", None
        elif limit_field != "max_tokens":
            field, requested = limit_field, body.get(limit_field)
        else:
            field, requested = one_token_limit(body)
        if eff.max_tokens is not None and requested is not None and requested > eff.max_tokens:
            raise MaxTokensExceeded(
                f"{field} is {requested}, above this organization's maximum of "
                f"{eff.max_tokens} tokens per request.",
                param=field,
            )
        if eff.unlimited and eff.max_prompt_tokens is None and eff.max_tokens is None:
            return Admission(
                request_id=request_id, tenant=tenant, key_id=key_id, model=model, timeout_s=eff.timeout_s
            )  # nothing to hold or cap: no tokenizer run
        count = await self.counter.count(model, endpoint, body, size)
        if eff.max_prompt_tokens is not None and count.tokens > eff.max_prompt_tokens:
            how = "tokens" if count.exact else "tokens (counted as bytes: no tokenizer for this model)"
            raise ContextLengthExceeded(
                f"The prompt is up to {count.tokens} {how}, above this organization's "
                f"maximum of {eff.max_prompt_tokens}.",
                param=PROMPT_FIELD.get(endpoint, "prompt"),
            )
        if endpoint == "embeddings":  # nothing is generated: the prompt is the whole cost
            return await self.limiter.admit(
                tenant,
                key_id,
                request_id,
                model,
                prompt_tokens=count.tokens,
                completion_tokens=0,
                effective=eff,
            )
        context = self.context_length(model)
        cap = min(v for v in (requested, eff.max_tokens, context) if v is not None)
        if requested is None and eff.max_tokens is not None and eff.max_tokens < context:
            room = context - count.tokens if count.exact else eff.max_tokens
            cap = max(1, min(eff.max_tokens, room))
            body[limit_field] = cap  # the worker may then never produce more than was held
        choices = max(_int(body.get("n")), _int(body.get("best_of")))
        return await self.limiter.admit(
            tenant,
            key_id,
            request_id,
            model,
            prompt_tokens=count.tokens,
            completion_tokens=count.prompts * choices * cap,
            effective=eff,
        )

    def timeout_s(self, adm: Admission) -> float | None:
        """The tenant's own request timeout, when shorter than the gateway's (else None)."""
        return adm.timeout_s if adm.timeout_s < self.limiter.defaults.request_timeout_s else None

    def logs_content(self, tenant_id: str) -> bool:
        """Whether the tenant turned content logging on (then, and only then, content may be stored)."""
        return self.content is not None and self.content.policy(tenant_id)[0]

    def release(self, adm: Admission) -> None:
        """The request ended before any usage event (none will come to settle the hold): drop it."""
        self.limiter.release(adm)

    def log_content(self, resp: Response, meter: RequestMeter, raw: bytes) -> Response:
        """The response, teed into the content log when the tenant turned it on."""
        if self.content is None:
            return resp
        return self.content.wrap(
            resp,
            request_id=meter.request_id,
            tenant_id=meter.tenant_id,
            key_id=meter.key_id,
            model=meter.model,
            request=raw,
            keep_response=meter.endpoint == "responses" and wants_store(raw),
        )


def wants_store(raw: bytes) -> bool:
    """A Responses API request asks to be stored unless it says `"store": false` (OpenAI's default)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("store", True) is not False


def one_token_limit(body: dict[str, Any]) -> tuple[str, int | None]:
    """The one completion-token limit of a request, written back as the body's only such field.

    A client may send `max_tokens`, `max_completion_tokens` or both; vLLM obeys `max_completion_tokens`
    when both come, so forwarding both would let a request generate more than it was held and capped
    for. The rule: the smaller of the two is the limit, and the worker gets it as `max_tokens` alone
    (the field both endpoints and every vLLM version take). Returns (the field the client used for
    it, the limit or None when the client set none)."""
    asked = [
        (v, f)
        for f in ("max_tokens", "max_completion_tokens")
        if isinstance(v := body.pop(f, None), int) and not isinstance(v, bool)
    ]
    if not asked:
        return "max_tokens", None
    limit, field = min(asked, key=lambda a: a[0])  # a tie names max_tokens
    body["max_tokens"] = limit
    return field, limit


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1
