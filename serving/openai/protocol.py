"""Wire types of the OpenAI-compatible API, for validation and the OpenAPI schema.

Request bodies are validated strictly (JSON types as OpenAI documents them, no coercion) and accept the
fields OpenAI documents for each endpoint plus a short list of vLLM
sampling extras; any other top-level field is refused with OpenAI's own message ("Unrecognized
request argument supplied: ..."), because vLLM also honours request fields that must never come from
a tenant (`priority`, `chat_template`, `logits_processors`, `kv_transfer_params`, `request_id`,
`prompt_logprobs`, ...). Inside messages and tool definitions unknown fields pass through (bounded by
the JSON depth and size checks in serving/limits/guard.py).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import InvalidRequest

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_TOOLS = 128

Str256 = Field(default=None, max_length=256)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None
    include_obfuscation: bool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1, max_length=32)
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    # strict: "n": "4" or "stream": "false" are refused, not coerced — the gateway forwards the body as
    # sent and sizes budget holds from it, so it must mean exactly what was validated.
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    user: str | None = Str256
    # vLLM sampling extras
    top_k: int | None = Field(default=None, ge=-1, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    length_penalty: float | None = Field(default=None, ge=-10, le=10)
    min_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP)
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(default=None, max_length=4096)
    guided_choice: list[str] | None = Field(default=None, max_length=1024)
    guided_grammar: str | None = Field(default=None, max_length=65_536)
    structured_outputs: dict[str, Any] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    reasoning_effort: str | None = Field(default=None, max_length=32)
    modalities: list[str] | None = Field(default=None, max_length=4)
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    echo: bool | None = None
    suffix: str | None = Field(default=None, max_length=65_536)


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the texts of one embeddings request


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: OpenAI's fields (served by a `kind: embedding` model)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        min_length=1, max_length=MAX_EMBEDDING_INPUTS
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=65_536)
    user: str | None = Str256


class ResponsesRequest(BaseModel):
    """POST /v1/responses: OpenAI's fields that vLLM's Responses API takes, plus its sampling extras.
    `background` is refused (an answer produced after the request ended could not be relayed or
    metered here); `store` is forced off unless the tenant logs content (serving/limits/guard.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_tool_calls: int | None = Field(default=None, ge=0, le=1024)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = Field(default=None, max_length=16)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    previous_response_id: str | None = Field(default=None, max_length=256)
    truncation: Literal["auto", "disabled"] | None = None
    store: bool | None = None
    background: Literal[False] | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    user: str | None = Str256
    # vLLM sampling extras
    top_k: int | None = Field(default=None, ge=-1, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(message, param) for the first validation error, in OpenAI's style."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden" and param is not None:
        return f"Unrecognized request argument supplied: {param}", param
    msg = err["msg"]
    return (f"Invalid value for '{param}': {msg}" if param else msg), (param or "")


def hoist_defs(doc: dict[str, Any]) -> dict[str, Any]:
    """Move the `$defs` of request schemas given inline (openapi_extra) into components.schemas, where
    their `#/components/schemas/...` references point, so the OpenAPI document is valid for clients,
    code generators and schemathesis."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for item in doc.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            for media in op.get("requestBody", {}).get("content", {}).values():
                schemas.update(media.get("schema", {}).pop("$defs", {}))
    return doc


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object (400 in OpenAI's shape otherwise)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in exc.msg or "surrogate" in exc.msg:
            raise InvalidRequest(
                "The request body is not valid UTF-8 JSON (invalid bytes or a lone surrogate).",
                code="invalid_utf8",
            ) from exc
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body
