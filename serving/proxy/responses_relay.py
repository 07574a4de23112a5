"""The Responses API (POST /v1/responses) on the way back: its usage and its stream.

vLLM's Responses stream is a sequence of typed SSE events (`event: response.output_text.delta` /
`data: {...}`), with no `data: [DONE]`: it ends with `response.completed` (or `response.incomplete`
when max_output_tokens cut it, `response.failed` when the model failed), whose `response.usage`
(input_tokens, output_tokens, input_tokens_details.cached_tokens) is the only usage it carries.
The relay passes every event through unchanged, one client write per upstream read as for chat, and
follows the same rules (serving/proxy/relay.py): the usage event is committed before the terminal
event is sent (no terminal event unless it is committed); a client that goes away is metered
`client_cancelled` and the worker's request is closed at once; a worker that fails is metered
`upstream_error` and the client gets an SSE error event in OpenAI's shape.

A stream cut before its terminal event carried no usage: the prompt is counted with the model's
tokenizer (the Responses input as the chat messages it becomes) and the output is the text deltas
relayed so far (one token per delta, or the tokenizer's count of their text), marked `estimated`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from metering.events import Outcome
from serving.errors import UpstreamError
from serving.proxy.relay import StreamRelay

TERMINAL: dict[str, Outcome] = {
    "response.completed": Outcome.OK,
    "response.incomplete": Outcome.OK,  # max_output_tokens reached: a whole, billable answer
    "response.failed": Outcome.UPSTREAM_ERROR,
}


def usage_of(endpoint: str, usage: Any) -> dict[str, Any] | None:
    """A worker's usage object in the chat shape the meter takes (RequestMeter.take_usage)."""
    if not isinstance(usage, dict) or not usage:
        return None
    if endpoint != "responses":
        return usage
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return {
        "prompt_tokens": usage.get("input_tokens") or 0,
        "completion_tokens": usage.get("output_tokens") or 0,
        "prompt_tokens_details": {"cached_tokens": cached or 0},
    }


def output_texts(response: dict[str, Any]) -> dict[int, str]:
    """The generated text of a Responses answer, per output item (for an estimate without usage)."""
    texts: dict[int, str] = {}
    for i, item in enumerate(response.get("output") or []):
        if not isinstance(item, dict):
            continue
        parts = [p.get("text") for p in item.get("content") or [] if isinstance(p, dict)]
        text = "".join(p for p in parts if isinstance(p, str))
        args = item.get("arguments")  # a function call's arguments are generated too
        texts[i] = text + (args if isinstance(args, str) else "")
    return texts


class ResponsesRelay(StreamRelay):
    """StreamRelay's rules over the Responses API's typed events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_line: bytes | None = None  # the `event:` line of the event being read

    def _events(self, lines: list[bytes], out: list[bytes]) -> tuple[Outcome, bytes] | None:
        meter = self.meter
        for line in lines:
            if line.startswith(b"event:"):
                self._event_line = line.rstrip(b"\r")
                continue
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            event_line, self._event_line = self._event_line, None
            framed = (event_line + b"\n" if event_line else b"") + b"data: " + payload + b"\n\n"
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                out.append(framed)
                continue
            if not isinstance(obj, dict):
                out.append(framed)
                continue
            kind = obj.get("type")
            if kind == "error" or ("error" in obj and kind is None):  # the worker's error: in our words
                failed = UpstreamError("The worker failed while generating this answer.")
                return Outcome.UPSTREAM_ERROR, failed.sse_event()
            response = obj.get("response")
            if isinstance(response, dict):
                usage = usage_of("responses", response.get("usage"))
                if usage is not None:
                    meter.take_usage(usage)
            if isinstance(kind, str) and kind.endswith(".delta"):
                self._delta(obj)
            if isinstance(kind, str) and kind in TERMINAL:
                return TERMINAL[kind], framed
            out.append(framed)
        return None

    def _delta(self, obj: dict[str, Any]) -> None:
        """A generated piece (text, refusal, function-call arguments): counted, and kept for an estimate."""
        self.content_chunks += 1
        self.token_chunks += 1
        if self._first:
            self._first = False
            self.metrics.child(self.metrics.ttft, self.metrics.model_label(self.meter.model)).observe(
                time.perf_counter() - self.t0
            )
        delta = obj.get("delta")
        if isinstance(delta, str) and delta and not self.meter.has_usage:
            index = obj.get("output_index")
            self._texts.setdefault(index if isinstance(index, int) else 0, []).append(delta)
