"""Helpers for the guardrail tests: gateways with limit settings, and the admin API."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from serving.settings import DEFAULT_ADMIN_TOKEN
from tests.conftest import Gateway, run_gateway

ADMIN = {"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}
REPO = Path(__file__).resolve().parents[2]
PRICE_BOOK = str(REPO / "configs" / "billing" / "price_books.yaml")


@asynccontextmanager
async def guarded_gateway(
    directory: Path, workers: list[tuple[str, str, str]], *, env: dict[str, str] | None = None, **kw: Any
) -> AsyncIterator[Gateway]:
    """run_gateway with extra settings given as TOKENPORT_* variables (read once, at load time)."""
    env = {"TOKENPORT_LIMITS__PRICE_BOOK": PRICE_BOOK, **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cm = run_gateway(directory, workers, **kw)
    try:
        gw = await cm.__aenter__()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield gw
    finally:
        await cm.__aexit__(None, None, None)


async def set_limits(gw: Gateway, tenant_id: str, **fields: Any) -> dict[str, Any]:
    r = await gw.http.patch(f"/admin/v1/tenants/{tenant_id}/limits", json=fields, headers=ADMIN)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def set_key_limits(gw: Gateway, key_id: str, **fields: Any) -> dict[str, Any]:
    r = await gw.http.patch(f"/admin/v1/keys/{key_id}/limits", json=fields, headers=ADMIN)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def budget(gw: Gateway, tenant_id: str) -> dict[str, Any]:
    r = await gw.http.get(f"/admin/v1/tenants/{tenant_id}/budget", headers=ADMIN)
    assert r.status_code == 200, r.text
    return dict(r.json()["budget"])


async def settled_budget(gw: Gateway, tenant_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The budget once no request holds any of it (every settle has run)."""
    deadline = time.monotonic() + timeout
    while True:
        b = await budget(gw, tenant_id)
        if b["held"] == "0" and b["requests_in_flight"] == 0:
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"budget still held after {timeout}s: {b}")
        await asyncio.sleep(0.05)


def ledger_tokens(gw: Gateway, tenant_id: str) -> int:
    return sum(e.event.prompt_tokens + e.event.completion_tokens for e in gw.events_for(tenant_id))


def chat(text: str = "Say hello", /, **extra: Any) -> dict[str, Any]:
    from tests.conftest import MODEL

    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


async def stream_all(
    http: httpx.AsyncClient, api_key: str, body: dict[str, Any], *, cut_after: int | None = None
) -> tuple[int, httpx.Headers, bytes]:
    """POST a streamed request; read it all (or drop the connection after `cut_after` bytes chunks)."""
    async with http.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=bearer(api_key)
    ) as resp:
        data = b""
        n = 0
        async for chunk in resp.aiter_bytes():
            data += chunk
            n += 1
            if cut_after is not None and n >= cut_after:
                break
        return resp.status_code, resp.headers, data
