"""The fake upstream's fixed bodies: a vLLM chat completion and a vLLM stream with continuous usage.

Shapes follow vLLM's OpenAI server (0.x) when asked with
`stream_options: {"include_usage": true, "continuous_usage_stats": true}`: a role chunk, 20 content
chunks that each carry the cumulative usage, a final `choices: []` usage chunk, then `data: [DONE]`.
The same bodies are served by nginx (`return 200 '...'`) and by the slow Python upstream.
"""

from __future__ import annotations

import json

MODEL = "smollm2-135m-instruct"
CREATED = 1763900000
PROMPT_TOKENS = 31
# 20 content chunks, one token each (what a 20-chunk stream means in issue 7).
WORDS = (
    " The",
    " capital",
    " of",
    " Kazakhstan",
    " is",
    " Astana",
    ",",
    " a",
    " modern",
    " city",
    " on",
    " the",
    " Ishim",
    " River",
    " in",
    " the",
    " north",
    ".",
    " Hope",
    " that helps",
)
CONTENT_CHUNKS = len(WORDS)


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _usage(completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + completion,
        "completion_tokens": completion,
    }


def chat_json(request_id: str = "chatcmpl-bench0000000000000000000000") -> str:
    """A non-streaming vLLM chat completion with usage."""
    return _dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "reasoning_content": None,
                        "content": "".join(WORDS).strip(),
                        "tool_calls": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
            "usage": {**_usage(CONTENT_CHUNKS), "prompt_tokens_details": None},
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def _chunk(request_id: str, choices: list[dict[str, object]], completion: int) -> str:
    return (
        "data: "
        + _dumps(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": MODEL,
                "choices": choices,
                "usage": _usage(completion),
            }
        )
        + "\n\n"
    )


def sse_role_chunk(request_id: str = "chatcmpl-bench0000000000000000000000") -> str:
    return _chunk(
        request_id,
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        0,
    )


def sse_content_chunk(
    i: int, *, last: bool, request_id: str = "chatcmpl-bench0000000000000000000000", word: str | None = None
) -> str:
    choice: dict[str, object] = {
        "index": 0,
        "delta": {"content": word if word is not None else WORDS[i % len(WORDS)]},
        "logprobs": None,
        "finish_reason": "stop" if last else None,
    }
    if last:
        choice["stop_reason"] = None
    return _chunk(request_id, [choice], i + 1)


def sse_tail(completion: int, request_id: str = "chatcmpl-bench0000000000000000000000") -> str:
    return _chunk(request_id, [], completion) + "data: [DONE]\n\n"


def sse_body() -> str:
    parts = [sse_role_chunk()]
    parts += [sse_content_chunk(i, last=i == CONTENT_CHUNKS - 1) for i in range(CONTENT_CHUNKS)]
    parts.append(sse_tail(CONTENT_CHUNKS))
    return "".join(parts)


NGINX_TOKEN_MAX = 3000  # nginx refuses a config token longer than 4 KB


def nginx_literal(body: str) -> str:
    """The body as an nginx single-quoted string (newlines as \\n; no quote, backslash or $ inside)."""
    for bad in ("'", "\\", "$"):
        if bad in body:
            raise ValueError(f"body contains {bad!r}, which nginx would interpret")
    return "'" + body.replace("\n", "\\n") + "'"


def nginx_return(body: str, var: str) -> str:
    """nginx directives answering 200 with `body`: one `return`, or, past nginx's 4 KB token limit,
    `set` parts of it into variables and return their concatenation."""
    if len(body) <= NGINX_TOKEN_MAX:
        return f"return 200 {nginx_literal(body)};"
    parts = [body[i : i + NGINX_TOKEN_MAX] for i in range(0, len(body), NGINX_TOKEN_MAX)]
    sets = " ".join(f"set ${var}{i} {nginx_literal(part)};" for i, part in enumerate(parts))
    return sets + ' return 200 "' + "".join(f"${var}{i}" for i in range(len(parts))) + '";'
