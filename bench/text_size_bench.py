"""Micro-benchmark: what the per-event text size (issue 15) adds to one request, in µs.

    PYTHONPATH=. python -m bench.text_size_bench

Counts a chat prompt (system + user message) once, then the content deltas of a streamed answer of
`--tokens` chunks from the chunks the relay already parsed (no second JSON parse), in English
(ASCII: no encoding) and in Kazakh (one UTF-8 encode a delta).
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import orjson

from metering.recorder import RequestMeter
from metering.tokencount import prompt_text
from serving.proxy.textsize import count_choices

PROMPTS = {
    "en": "How much does a container from Almaty to Tianjin cost this month? " * 4,
    "kk": "Алматыдан Тяньцзиньге контейнер бұл айда қанша тұрады? " * 4,
}
WORDS = {"en": " word", "kk": " сөз"}


def _request(lang: str, tokens: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are a logistics assistant."},
            {"role": "user", "content": PROMPTS[lang]},
        ],
    }
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": WORDS[lang]}, "finish_reason": None}],
    }
    chunks = [orjson.loads(orjson.dumps(chunk)) for _ in range(tokens)]  # as the relay holds them
    return body, chunks


def run(lang: str, tokens: int, number: int) -> float:
    body, chunks = _request(lang, tokens)
    meter = RequestMeter(
        request_id="r",
        tenant_id="t",
        key_id="k",
        model="m",
        endpoint="chat.completions",
        origin_country="KZ",
        origin_source="tenant",
        stream=True,
    )

    def one() -> None:
        meter.measure_prompt(prompt_text("chat.completions", body))
        for c in chunks:
            count_choices(meter, c["choices"])

    return min(timeit.repeat(one, number=number, repeat=5)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--number", type=int, default=2000)
    a = ap.parse_args()
    for lang in PROMPTS:
        us = run(lang, a.tokens, a.number)
        print(
            f"{lang}: {us:.1f} µs per request ({a.tokens} streamed chunks), {us / a.tokens * 1000:.0f} ns "
            "per chunk"
        )


if __name__ == "__main__":
    main()
