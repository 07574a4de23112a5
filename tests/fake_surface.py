"""The fake worker's embeddings and Responses endpoints (tests/fakes.py registers them), answering
as vLLM 0.32 does: `/v1/embeddings` with `usage.prompt_tokens` (and vLLM's 400 for `dimensions` on a
model without Matryoshka embeddings), `/v1/responses` with `usage.input_tokens` / `output_tokens` /
`input_tokens_details.cached_tokens`, streamed as typed events (`event: TYPE` + `data: {...}`) that
end with `response.completed`, without `data: [DONE]`. The knobs are the FakeWorker's Behaviour:
tokens, prompt_tokens, cached_tokens, delay_s, status/error_body, die_after, omit_usage."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from tests.fakes import FakeWorker

MATRYOSHKA = {
    "error": {
        "message": 'Model "x" does not support matryoshka representation, changing output '
        "dimensions will lead to poor results.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}
DIM = 4


async def embeddings(fake: FakeWorker, request: web.Request) -> web.Response:
    from tests.fakes import ReceivedRequest

    b = fake.behaviour
    body: dict[str, Any] = orjson.loads(await request.read())
    rec = ReceivedRequest(
        path=request.path,
        body=body,
        headers={k.lower(): v for k, v in request.headers.items()},
        started_at=time.monotonic(),
        finished=True,
    )
    fake.requests.append(rec)
    if b.status != 200:
        return web.Response(status=b.status, body=orjson.dumps(b.error_body), content_type="application/json")
    if body.get("dimensions") is not None:
        return web.Response(status=400, body=orjson.dumps(MATRYOSHKA), content_type="application/json")
    inputs = body["input"]
    n = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    vector = [0.5, -0.25, 0.125, 1.0][:DIM]
    data: list[dict[str, Any]] = []
    for i in range(n):
        emb: Any = vector
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack(f"<{DIM}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    obj: dict[str, Any] = {
        "id": "embd-fake",
        "object": "list",
        "created": 1,
        "model": body["model"],
        "data": data,
    }
    if not b.omit_usage:
        obj["usage"] = {
            "prompt_tokens": b.prompt_tokens,
            "total_tokens": b.prompt_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _usage(fake: FakeWorker, output: int) -> dict[str, Any]:
    b = fake.behaviour
    return {
        "input_tokens": b.prompt_tokens,
        "output_tokens": output,
        "total_tokens": b.prompt_tokens + output,
        "input_tokens_details": {"cached_tokens": b.cached_tokens},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _response(
    fake: FakeWorker, model: str, status: str, text: str, usage: dict[str, Any] | None, rid: str = "resp_fake"
) -> dict[str, Any]:
    content: list[dict[str, Any]] = [
        {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
    ]
    return {
        "id": rid,
        "object": "response",
        "created_at": 1,
        "model": model,
        "status": status,
        "output": [
            {
                "type": "message",
                "id": "msg_fake",
                "role": "assistant",
                "status": status,
                "content": content if status == "completed" else [],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


async def responses(fake: FakeWorker, request: web.Request) -> web.StreamResponse:
    from tests.fakes import ReceivedRequest, _Aborted

    b = fake.behaviour
    body: dict[str, Any] = orjson.loads(await request.read())
    rec = ReceivedRequest(
        path=request.path,
        body=body,
        headers={k.lower(): v for k, v in request.headers.items()},
        started_at=time.monotonic(),
    )
    fake.requests.append(rec)
    if b.status != 200:
        rec.finished = True
        return web.Response(status=b.status, body=orjson.dumps(b.error_body), content_type="application/json")
    model = str(body.get("model"))
    text = "".join(f" w{i}" for i in range(b.tokens))
    usage = None if b.omit_usage else _usage(fake, b.tokens)
    rid = f"resp_{len(fake.requests)}"  # one id per request, as vLLM gives
    if not body.get("stream"):
        rec.finished = True
        return web.Response(
            body=orjson.dumps(_response(fake, model, "completed", text, usage, rid)),
            content_type="application/json",
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response(fake, model, "in_progress", "", None, rid)},
        {"type": "response.in_progress", "response": _response(fake, model, "in_progress", "", None, rid)},
    ]
    events += [
        {
            "type": "response.output_text.delta",
            "item_id": "msg_fake",
            "output_index": 0,
            "content_index": 0,
            "delta": f" w{i}",
            "logprobs": [],
        }
        for i in range(b.tokens)
    ]
    events.append(
        {
            "type": "response.output_text.done",
            "item_id": "msg_fake",
            "output_index": 0,
            "content_index": 0,
            "text": text,
            "logprobs": [],
        }
    )
    events.append(
        {"type": "response.completed", "response": _response(fake, model, "completed", text, usage, rid)}
    )
    try:
        for seq, ev in enumerate(events):
            if b.die_after is not None and rec.events_sent >= b.die_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if b.delay_s:
                await asyncio.sleep(b.delay_s)
            ev["sequence_number"] = seq
            await fake._write(
                request, resp, rec, f"event: {ev['type']}\ndata: ".encode() + orjson.dumps(ev) + b"\n\n"
            )
        await resp.write_eof()
        rec.finished = True
    except _Aborted:
        pass
    except asyncio.CancelledError:
        fake._mark_aborted(rec)
        raise
    return resp
