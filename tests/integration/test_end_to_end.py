"""End to end with real parts: the official openai client -> `tokenport gateway` -> a real vLLM worker.

The ledger must equal, token for token, what the worker reported: in the response's usage where the
client sees it, and otherwise in the worker's own Prometheus counters (this worker serves only this
test session, and the tests run one at a time). /metrics must move by the same amounts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from metering.db import make_engine
from metering.store_sql import UsageStore
from tests.integration.conftest import MODEL, Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tenant(gateway: Gateway) -> dict[str, Any]:
    t = gateway.cli_json(
        "tenants",
        "create",
        "--id",
        "kz-bank",
        "--name",
        "Almaty Bank JSC",
        "--billing-country",
        "KZ",
        "--business",
        "--tax-id",
        "123456789013",
        "--currency",
        "USD",
    )
    key = gateway.cli_json("keys", "create", "--tenant", "kz-bank")
    assert isinstance(t, dict) and isinstance(key, dict)
    return {"tenant": t, "key": key}


@pytest.fixture()
def client(gateway: Gateway, tenant: dict[str, Any]) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(
        base_url=gateway.url + "/v1",
        api_key=tenant["key"]["key"],
        max_retries=0,
        default_headers={"X-Client-Country": "UZ"},
    )
    yield c
    c.close()


def ledger(gateway: Gateway) -> UsageStore:
    return UsageStore(make_engine(f"sqlite:///{gateway.data_dir / 'tokenport.db'}"))


def scrape(url: str, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(url: str, name: str, **labels: str) -> float:
    return sum(scrape(url, name, **labels).values())


def worker_counts(worker_url: str) -> tuple[float, float]:
    return (total(worker_url, "vllm:prompt_tokens_total"), total(worker_url, "vllm:generation_tokens_total"))


def gateway_tokens(gw: Gateway, token_type: str) -> float:
    return total(
        gw.metrics_url,
        "tokenport_tokens_total",
        tenant="kz-bank",
        model=MODEL,
        token_type=token_type,
        origin_country="UZ",
    )


def check_request(gw: Gateway, request_id: str, *, prompt: int, completion: int, stream: bool) -> None:
    stored = ledger(gw).get(request_id)
    assert stored is not None, f"{request_id} not in the ledger"
    e = stored.event
    assert (e.prompt_tokens, e.completion_tokens) == (prompt, completion)
    assert e.stream is stream and e.outcome.value == "ok" and not e.estimated
    assert (e.tenant_id, e.model, e.origin_country, e.origin_source) == ("kz-bank", MODEL, "UZ", "header")
    assert e.key_id.startswith("key_")


class Deltas:
    """Worker counters and gateway metrics before/after one request."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.worker0 = worker_counts(gw.worker_url)
        self.gw0 = {t: gateway_tokens(gw, t) for t in ("input", "cached_input", "output")}

    def check(self, prompt: int, completion: int, cached: int = 0) -> None:
        deadline = time.monotonic() + 10  # the worker's counters are updated by its engine loop
        while True:
            w = worker_counts(self.gw.worker_url)
            dw = (w[0] - self.worker0[0], w[1] - self.worker0[1])
            if dw == (prompt, completion) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert dw == (prompt, completion), f"worker counted {dw}, ledger has {(prompt, completion)}"
        g = {t: gateway_tokens(self.gw, t) - self.gw0[t] for t in self.gw0}
        assert g == {"input": prompt - cached, "cached_input": cached, "output": completion}


MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Привет! Расскажи коротко о Ташкенте."}
]


def test_chat_non_stream(gateway: Gateway, client: openai.OpenAI) -> None:
    d = Deltas(gateway)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    r = raw.parse()
    rid = raw.headers["x-request-id"]
    assert r.usage is not None and r.usage.completion_tokens > 0 and r.choices[0].message.content
    check_request(
        gateway, rid, prompt=r.usage.prompt_tokens, completion=r.usage.completion_tokens, stream=False
    )
    d.check(r.usage.prompt_tokens, r.usage.completion_tokens)
    assert ledger(gateway).get(rid).event.language == "ru"  # type: ignore[union-attr]


def test_chat_stream_with_usage(gateway: Gateway, client: openai.OpenAI) -> None:
    d = Deltas(gateway)
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, stream=True, stream_options={"include_usage": True}
    ) as resp:
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    u = usage_chunks[0].usage
    assert u is not None
    check_request(gateway, rid, prompt=u.prompt_tokens, completion=u.completion_tokens, stream=True)
    d.check(u.prompt_tokens, u.completion_tokens)


def test_chat_stream_without_usage_is_still_metered(gateway: Gateway, client: openai.OpenAI) -> None:
    d = Deltas(gateway)
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=9, stream=True
    ) as resp:
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    stored = ledger(gateway).get(rid)
    assert stored is not None and stored.event.completion_tokens > 0
    check_request(
        gateway,
        rid,
        prompt=stored.event.prompt_tokens,
        completion=stored.event.completion_tokens,
        stream=True,
    )
    d.check(stored.event.prompt_tokens, stored.event.completion_tokens)


def test_completions_non_stream_and_stream(gateway: Gateway, client: openai.OpenAI) -> None:
    d = Deltas(gateway)
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of Kazakhstan is", max_tokens=8
    )
    r = raw.parse()
    assert r.usage is not None
    check_request(
        gateway,
        raw.headers["x-request-id"],
        prompt=r.usage.prompt_tokens,
        completion=r.usage.completion_tokens,
        stream=False,
    )
    d.check(r.usage.prompt_tokens, r.usage.completion_tokens)

    d = Deltas(gateway)
    with client.completions.with_streaming_response.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        rid = resp.headers["x-request-id"]
        chunks = list(resp.parse())
    u = chunks[-1].usage
    assert u is not None and u.completion_tokens > 0
    check_request(gateway, rid, prompt=u.prompt_tokens, completion=u.completion_tokens, stream=True)
    d.check(u.prompt_tokens, u.completion_tokens)


def test_async_client_stream(gateway: Gateway, tenant: dict[str, Any]) -> None:
    import asyncio

    async def go() -> tuple[str, int]:
        c = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=tenant["key"]["key"], max_retries=0)
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
        last = None
        async for chunk in stream:
            last = chunk
        await c.close()
        assert last is not None and last.usage is not None
        return last.id, last.usage.completion_tokens

    _id, n = asyncio.run(go())
    assert n > 0


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids and len(ids) == len(set(ids))  # beside it: the catalogue's embedding model


def test_errors_in_openai_shape(gateway: Gateway, client: openai.OpenAI, tenant: dict[str, Any]) -> None:
    count = ledger(gateway).count()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=1000)
    raw = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Authorization": f"Bearer {tenant['key']['key']}", "Content-Type": "application/json"},
    )
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.headers["x-request-id"].startswith("req_")
    bad = openai.OpenAI(base_url=gateway.url + "/v1", api_key="tp_nope_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert ledger(gateway).count() == count  # rejected before a worker saw them: nothing metered


def test_revoked_key_is_refused_at_once(gateway: Gateway) -> None:
    key = gateway.cli_json("keys", "create", "--tenant", "kz-bank")
    assert isinstance(key, dict)
    c = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key["key"], max_retries=0)
    assert c.models.list().data
    gateway.cli("keys", "revoke", key["id"])
    deadline = time.monotonic() + 1.0
    while True:
        try:
            c.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "revoked key still accepted after 1 s"
        time.sleep(0.05)


def test_usage_export_and_summary(gateway: Gateway) -> None:
    rows = [
        json.loads(line) for line in gateway.cli("usage", "export", "--tenant", "kz-bank").stdout.splitlines()
    ]
    assert rows and list(rows[0]) == [  # every field of UsageEvent, in its order (metering/events.py)
        "request_id",
        "tenant_id",
        "key_id",
        "model",
        "endpoint",
        "origin_country",
        "origin_source",
        "language",
        "serving_region",
        "worker_id",
        "prompt_tokens",
        "cached_prompt_tokens",
        "completion_tokens",
        "stream",
        "outcome",
        "estimated",
        "started_at",
        "finished_at",
        "prompt_chars",
        "prompt_bytes",
        "completion_chars",
        "completion_bytes",
    ]
    csv_out = gateway.cli("usage", "export", "--tenant", "kz-bank", "--format", "csv").stdout.splitlines()
    assert len(csv_out) == len(rows) + 1
    summary = gateway.cli_json("usage", "summary", "--by", "tenant,origin_country,model")
    assert isinstance(summary, list)
    mine = [s for s in summary if s["tenant_id"] == "kz-bank"]
    assert {s["origin_country"] for s in mine} == {r["origin_country"] for r in rows} == {"UZ", "KZ"}
    assert sum(s["completion_tokens"] for s in mine) == sum(r["completion_tokens"] for r in rows)
    assert sum(s["requests"] for s in mine) == len(rows)
