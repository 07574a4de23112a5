"""The completion's text size on the usage event: characters and UTF-8 bytes of what the worker
generated (never the text itself), counted from the choices the gateway already parsed.

A whole answer's choices carry `message.content` (chat) or `text` (completions); a streamed chunk's
carry `delta.content` or `text`. The relay counts a chunk when it relays it, so a cut stream is
sized by what reached the client's side of the gateway.
"""

from __future__ import annotations

from typing import Any

from metering.recorder import RequestMeter


def count_choices(meter: RequestMeter, choices: Any) -> None:
    """Add the generated text of `choices` (a whole answer's or one chunk's) to the meter."""
    if not isinstance(choices, list):
        return
    for c in choices:
        if not isinstance(c, dict):
            continue
        part = c.get("delta")
        if part is None:
            part = c.get("message")
        text = part.get("content") if isinstance(part, dict) else c.get("text")
        if text and isinstance(text, str):  # inlined RequestMeter.add_completion: once per streamed chunk
            n = len(text)
            meter.completion_chars = (meter.completion_chars or 0) + n
            meter.completion_bytes = (meter.completion_bytes or 0) + (
                n if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            )
