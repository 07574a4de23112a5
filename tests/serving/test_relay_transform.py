"""StreamRelay._transform: usage removed from content chunks as the client asked, byte-exact."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from serving.proxy.relay import StreamRelay


def _relay(*, want_usage: bool, want_continuous: bool) -> StreamRelay:
    resp: Any = SimpleNamespace(read_some=None)
    return StreamRelay(
        meter=None,  # type: ignore[arg-type]
        resp=resp,
        recorder=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
        want_usage=want_usage,
        want_continuous=want_continuous,
        t0=0.0,
    )


TRICKY = (
    b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":'
    b'"say ,\\"usage\\":{} and }"},"finish_reason":null}],"usage":{"prompt_tokens":5,'
    b'"total_tokens":7,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":0}}}'
)


@pytest.mark.parametrize(
    "payload",
    [
        TRICKY,
        # not vLLM's layout (usage first, spaces): re-encoded instead of cut
        b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": [{"index": 0, "text": "x"}]}',
    ],
)
def test_usage_is_removed_from_content_chunks(payload: bytes) -> None:
    relay = _relay(want_usage=True, want_continuous=False)
    out = relay._transform(orjson.loads(payload), payload)
    assert out is not None
    expected = orjson.loads(payload)
    del expected["usage"]
    assert orjson.loads(out) == expected


def test_usage_only_chunk_kept_or_dropped_as_asked() -> None:
    final = b'{"id":"c","choices":[],"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}}'
    assert _relay(want_usage=True, want_continuous=False)._transform(orjson.loads(final), final) == final
    assert _relay(want_usage=False, want_continuous=False)._transform(orjson.loads(final), final) is None
    both = _relay(want_usage=True, want_continuous=True)
    assert both._transform(orjson.loads(TRICKY), TRICKY) == TRICKY
