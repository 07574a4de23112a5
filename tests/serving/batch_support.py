"""Helpers for the Batch API tests: input files, polling a batch, reading its result files."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import orjson
from openai.types import Batch

from tests.conftest import MODEL

FINAL = {"completed", "failed", "expired", "cancelled"}


def chat_line(custom_id: str, text: str = "Say hello", **extra: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra},
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return b"".join((ln.encode() if isinstance(ln, str) else orjson.dumps(ln)) + b"\n" for ln in lines)


async def submit(
    client: openai.AsyncOpenAI, data: bytes, endpoint: str = "/v1/chat/completions", **kw: Any
) -> Batch:
    f = await client.files.create(file=("input.jsonl", data), purpose="batch")
    return await client.batches.create(
        input_file_id=f.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        **kw,
    )


async def wait_for(
    client: openai.AsyncOpenAI, batch_id: str, statuses: set[str] = FINAL, timeout: float = 20.0
) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        b = await client.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {b.status} after {timeout}s: {b.request_counts}")
        await asyncio.sleep(0.05)


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [orjson.loads(ln) for ln in content.content.splitlines() if ln.strip()]
