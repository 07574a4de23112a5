"""Money paths attacked with the real vLLM worker (issue 12).

An attacker controls the body: split token fields (`max_tokens` 1 with `max_completion_tokens` 300,
which vLLM honours over `max_tokens`), `ignore_eos` so the worker really generates every allowed
token, many requests at once. Budgets, per-request caps and TPM limits must hold to the token, and a
request cut by the tenant's own timeout must still bill the work the worker did.
Everything is read back through the product's own surfaces: responses, `tenants limits --json` and
`usage export`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.integration.conftest import MODEL, Gateway, reliability

pytestmark = pytest.mark.integration

SPLIT = {"max_tokens": 1, "max_completion_tokens": 300, "ignore_eos": True}


def new_tenant(gw: Gateway, tenant_id: str, *limits: str) -> str:
    gw.cli_json(
        "tenants",
        "create",
        "--id",
        tenant_id,
        "--name",
        tenant_id,
        "--billing-country",
        "KZ",
        "--consumer",
        "--currency",
        "USD",
    )
    if limits:
        gw.cli("tenants", "set-limits", tenant_id, *limits)
    key = gw.cli_json("keys", "create", "--tenant", tenant_id)
    assert isinstance(key, dict)
    time.sleep(0.6)  # limits reach the gateway within gateway.key_cache_refresh_s
    return str(key["key"])


def budget_used(gw: Gateway, tenant_id: str) -> tuple[float, float]:
    out = gw.cli_json("tenants", "limits", tenant_id)
    assert isinstance(out, dict) and out["budget_use"] is not None
    return float(out["budget_use"]["used"]), float(out["budget_use"]["limit"])


def events(gw: Gateway, tenant_id: str) -> list[dict[str, Any]]:
    out = gw.cli("usage", "export", "--tenant", tenant_id, "--format", "jsonl").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def body(stream: bool, **extra: Any) -> dict[str, Any]:
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}],
        "stream": stream,
        **usage,
        **extra,
    }


async def fire(gw: Gateway, key: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=gw.url, timeout=120, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        return list(await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies)))


def completion_tokens(resp: httpx.Response) -> int:
    """The completion tokens the worker generated for one 200 answer (JSON or SSE)."""
    if resp.headers.get("content-type", "").startswith("application/json"):
        return int(resp.json()["usage"]["completion_tokens"])
    last = 0
    for line in resp.text.splitlines():
        if line.startswith("data: {"):
            usage = json.loads(line[6:]).get("usage")
            if usage:
                last = int(usage["completion_tokens"])
    return last


def test_split_token_fields_never_pass_a_token_budget(gateway: Gateway) -> None:
    key = new_tenant(gateway, "atk-budget", "--budget", "400", "--budget-unit", "tokens")
    bodies = [body(i % 2 == 0, **SPLIT) for i in range(24)]
    answers = asyncio.run(fire(gateway, key, bodies))
    assert all(r.status_code in (200, 400, 429) for r in answers), [r.status_code for r in answers]
    ok = [r for r in answers if r.status_code == 200]
    assert all(completion_tokens(r) <= 1 for r in ok), [completion_tokens(r) for r in ok]
    used, limit = budget_used(gateway, "atk-budget")
    reliability(
        "24 concurrent split-field requests on a 400-token budget",
        requests=len(answers),
        faults=24,
        overspend=max(0, int(used - limit)),
        server_errors=sum(r.status_code >= 500 for r in answers),
    )
    assert used <= limit == 400
    billed = sum(e["prompt_tokens"] + e["completion_tokens"] for e in events(gateway, "atk-budget"))
    assert billed == used


def test_split_token_fields_never_pass_the_per_request_cap(gateway: Gateway) -> None:
    key = new_tenant(gateway, "atk-cap", "--max-tokens", "20")
    answers = asyncio.run(
        fire(
            gateway,
            key,
            [
                body(False, **SPLIT | {"max_tokens": 5}),
                body(True, max_completion_tokens=300, ignore_eos=True),
            ],
        )
    )
    for r in answers:
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert completion_tokens(r) <= 20
        else:
            assert r.json()["error"]["param"] in ("max_tokens", "max_completion_tokens")


def test_split_token_fields_never_pass_a_tpm_limit(gateway: Gateway) -> None:
    key = new_tenant(gateway, "atk-tpm", "--tpm", "600")
    answers = asyncio.run(fire(gateway, key, [body(i % 2 == 1, **SPLIT) for i in range(16)]))
    assert all(r.status_code in (200, 400, 429) for r in answers), [r.status_code for r in answers]
    billed = sum(e["prompt_tokens"] + e["completion_tokens"] for e in events(gateway, "atk-tpm"))
    reliability(
        "16 concurrent split-field requests on a 600 TPM limit",
        requests=len(answers),
        faults=16,
        overspend=max(0, billed - 600),
        server_errors=sum(r.status_code >= 500 for r in answers),
    )
    assert billed <= 600


def test_a_request_cut_by_its_timeout_bills_the_prompt(gateway: Gateway) -> None:
    key = new_tenant(
        gateway, "atk-timeout", "--timeout", "1", "--budget", "100000", "--budget-unit", "tokens"
    )
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json=body(False, max_tokens=1500, ignore_eos=True),
    )
    assert r.status_code in (502, 504), r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    request_id = r.headers["x-request-id"]
    time.sleep(0.5)
    billed = {e["request_id"]: e for e in events(gateway, "atk-timeout")}
    assert request_id in billed
    assert billed[request_id]["prompt_tokens"] > 0  # the worker prefilled it: the prompt is billed
    used, _ = budget_used(gateway, "atk-timeout")
    assert used >= billed[request_id]["prompt_tokens"]
