"""Many streams at once: one ledger row each, exact totals, nothing left in flight."""

from __future__ import annotations

import asyncio

import openai

from metering.events import Outcome
from tests.conftest import MODEL, Gateway, TenantKey, metric
from tests.fakes import FakeWorker

N = 50


async def test_50_concurrent_streams_are_each_metered_once(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    worker.behave(tokens=6, prompt_tokens=17, cached_tokens=4, delay_s=0.01)
    before = await gateway.metrics()

    async def one(i: int) -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"request {i}"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 6
        return raw.headers["x-request-id"], text

    results = await asyncio.gather(*(one(i) for i in range(N)))
    ids = [rid for rid, _ in results]
    assert len(set(ids)) == N
    assert all(text == " w0 w1 w2 w3 w4 w5" for _, text in results)
    assert len(worker.completion_requests()) == N

    rows = gateway.events_for(tenant.tenant.id)
    assert sorted(r.event.request_id for r in rows) == sorted(ids)
    assert all(r.event.outcome is Outcome.OK and r.event.stream for r in rows)
    assert sum(r.event.prompt_tokens for r in rows) == 17 * N
    assert sum(r.event.cached_prompt_tokens for r in rows) == 4 * N
    assert sum(r.event.completion_tokens for r in rows) == 6 * N
    assert len({r.seq for r in rows}) == N

    after = await gateway.metrics()
    t = tenant.tenant.id

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("tokenport_tokens_total", tenant=t, token_type="input") == 13 * N
    assert delta("tokenport_tokens_total", tenant=t, token_type="cached_input") == 4 * N
    assert delta("tokenport_tokens_total", tenant=t, token_type="output") == 6 * N
    assert delta("tokenport_requests_total", tenant=t, outcome="ok") == N
    assert metric(after, "tokenport_inflight_requests", model=MODEL) == 0
    # Group commit: fewer ledger transactions than events.
    commits = delta("tokenport_ledger_commit_batch_events_count")
    events = delta("tokenport_ledger_commit_batch_events_sum")
    assert events == N and 1 <= commits <= N
