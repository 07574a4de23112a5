"""The Batch API through a running gateway and the fake worker, with the official `openai` client:
OpenAI's objects and JSONL formats, per-line metering, bad lines, cancel, tenant isolation, limits,
priority below live traffic, and a batch that survives a gateway restart."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from datetime import date
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL, Gateway, run_gateway
from tests.fakes import FakeWorker
from tests.serving.batch_support import chat_line, jsonl, lines_of, submit, wait_for
from tests.serving.limits_support import ADMIN, REPO, guarded_gateway, set_limits

FAST = {"TOKENPORT_BATCHES__POLL_S": "0.05", "TOKENPORT_BATCHES__RETRY_S": "0.2"}


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with guarded_gateway(
        tmp_path_factory.mktemp("batch-gw"),
        [(MODEL, "f0", fake.url)],
        env=FAST,
        gateway={"max_body_bytes": 8192},
    ) as g:
        yield g


def new_client(gw: Gateway) -> tuple[str, openai.AsyncOpenAI]:
    t, _key, api_key = gw.new_tenant()
    return t.id, gw.client(api_key)


async def test_a_batch_runs_every_line_with_openai_shapes(gw: Gateway, worker: FakeWorker) -> None:
    tid, client = new_client(gw)
    data = jsonl(chat_line("a", max_tokens=5), chat_line("b", "Bonjour"), chat_line("c"))
    f = await client.files.create(file=("in.jsonl", data), purpose="batch")
    assert (f.object, f.purpose, f.bytes, f.filename, f.status) == (
        "file",
        "batch",
        len(data),
        "in.jsonl",
        "processed",
    )
    assert (await client.files.retrieve(f.id)).id == f.id
    assert (await client.files.content(f.id)).content == data
    b = await client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert (b.object, b.status, b.endpoint, b.completion_window, b.input_file_id) == (
        "batch",
        "validating",
        "/v1/chat/completions",
        "24h",
        f.id,
    )
    assert b.metadata == {"job": "nightly"} and b.expires_at == b.created_at + 86400
    done = await wait_for(client, b.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    out = await lines_of(client, done.output_file_id)
    assert [ln["custom_id"] for ln in out] == ["a", "b", "c"]
    for ln in out:
        assert ln["error"] is None and ln["id"].startswith("batch_req_")
        assert ln["response"]["status_code"] == 200
        assert ln["response"]["body"]["choices"][0]["message"]["content"]
        assert ln["response"]["request_id"].startswith("req_")
    out_file = await client.files.retrieve(done.output_file_id or "")
    assert out_file.purpose == "batch_output"
    # metered per line: one usage event per line, under the line's request id, as a batch endpoint
    events = {e.event.request_id: e.event for e in gw.events_for(tid)}
    assert set(events) == {ln["response"]["request_id"] for ln in out}
    assert {e.endpoint for e in events.values()} == {"batch.chat.completions"}
    assert all(e.origin_country == "DE" and not e.stream and e.outcome.value == "ok" for e in events.values())
    # the worker saw each line once, under its request id
    seen = [r.headers.get("x-request-id") for r in worker.completion_requests()]
    assert sorted(rid for rid in seen if rid in events) == sorted(events)
    # the live usage API shows them apart
    r = await gw.http.get(
        "/v1/usage", params={"group_by": "endpoint"}, headers={"Authorization": f"Bearer {client.api_key}"}
    )
    assert [row["endpoint"] for row in r.json()["data"]] == ["batch.chat.completions"]


async def test_bad_lines_go_to_the_error_file_and_never_fail_the_batch(
    gw: Gateway, worker: FakeWorker
) -> None:
    _tid, client = new_client(gw)
    data = jsonl(
        chat_line("ok-1"),
        "{not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # no custom_id
        chat_line("ok-1"),  # duplicate custom_id
        {**chat_line("wrong-url"), "url": "/v1/completions"},
        {**chat_line("get"), "method": "GET"},
        chat_line("no-such-model")
        | {"body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}},
        chat_line("bad-body") | {"body": {"model": MODEL, "messages": "not a list"}},
        chat_line("stream", stream=True),
        "",
        chat_line("ok-2"),
    )
    done = await wait_for(client, (await submit(client, data)).id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        10,
        2,
        8,
    )
    out = await lines_of(client, done.output_file_id)
    assert [ln["custom_id"] for ln in out] == ["ok-1", "ok-2"]
    errors = await lines_of(client, done.error_file_id)
    codes = [
        (ln["custom_id"], (ln["error"] or {}).get("code"), (ln["response"] or {}).get("status_code"))
        for ln in errors
    ]
    assert codes == [
        (None, "invalid_json_line", None),
        (None, "missing_custom_id", None),
        ("ok-1", "duplicate_custom_id", None),
        ("wrong-url", "mismatched_url", None),
        ("get", "invalid_method", None),
        ("no-such-model", None, 404),
        ("bad-body", None, 400),
        ("stream", None, 400),
    ]
    refused = {ln["custom_id"]: ln["response"]["body"]["error"] for ln in errors if ln["response"]}
    assert refused["no-such-model"]["code"] == "model_not_found"
    assert refused["stream"]["param"] == "stream"


async def test_a_worker_refusal_is_an_error_line(gw: Gateway, worker: FakeWorker) -> None:
    tid, client = new_client(gw)
    worker.behave(status=400)
    done = await wait_for(client, (await submit(client, jsonl(chat_line("x")))).id)
    assert done.status == "completed" and done.output_file_id is None
    [line] = await lines_of(client, done.error_file_id)
    assert line["response"]["status_code"] == 400 and line["error"] is None
    assert line["response"]["body"]["error"]["code"] == "upstream_rejected"
    [event] = gw.events_for(tid)  # metered once, as a rejected request (zero tokens)
    assert (
        event.event.outcome.value == "rejected" and event.event.request_id == line["response"]["request_id"]
    )


async def test_completions_batches_and_endpoints_of_the_route_table(gw: Gateway, worker: FakeWorker) -> None:
    tid, client = new_client(gw)
    line = {
        "custom_id": "p",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "Once upon", "max_tokens": 4},
    }
    done = await wait_for(client, (await submit(client, jsonl(line), endpoint="/v1/completions")).id)
    assert await lines_of(client, done.error_file_id) == []
    [out] = await lines_of(client, done.output_file_id)
    assert out["response"]["body"]["choices"][0]["text"]
    assert [e.event.endpoint for e in gw.events_for(tid)] == ["batch.completions"]
    f = await client.files.create(file=("in.jsonl", jsonl(line)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        await client.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h")
    assert err.value.body["param"] == "endpoint"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="48h")  # type: ignore[arg-type]


async def test_uploads_are_checked(gw: Gateway) -> None:
    _tid, client = new_client(gw)
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("in.jsonl", jsonl(chat_line("a"))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("in.jsonl", b"\xff\xfe not utf-8"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("in.jsonl", b"\n  \n"), purpose="batch")
    # a file larger than the completion routes' body cap is fine (its own cap: batches.max_file_bytes)
    big = jsonl(*[chat_line(f"l{i}", "x" * 200) for i in range(100)])
    assert len(big) > 8192
    assert (await client.files.create(file=("big.jsonl", big), purpose="batch")).bytes == len(big)


async def test_tenants_see_only_their_own_files_and_batches(gw: Gateway, worker: FakeWorker) -> None:
    _a, alice = new_client(gw)
    _b, bob = new_client(gw)
    batch = await submit(alice, jsonl(chat_line("a")))
    done = await wait_for(alice, batch.id)
    for call in (
        lambda: bob.files.retrieve(batch.input_file_id),
        lambda: bob.files.content(batch.input_file_id),
        lambda: bob.files.content(done.output_file_id or ""),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(
            input_file_id=batch.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            await call()
    assert [b.id async for b in bob.batches.list()] == []
    assert [b.id async for b in alice.batches.list()] == [batch.id]


async def test_list_is_paginated_newest_first(gw: Gateway, worker: FakeWorker) -> None:
    _tid, client = new_client(gw)
    ids = [(await submit(client, jsonl(chat_line("a")))).id for _ in range(3)]
    page = await client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = await client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data] == ids[:1] and not rest.has_more
    assert [b.id async for b in client.batches.list(limit=1)] == ids[::-1]  # the SDK's auto-paging


async def test_cancel_stops_the_lines_not_run_yet(gw: Gateway, worker: FakeWorker) -> None:
    tid, client = new_client(gw)
    await set_limits(gw, tid, rpm=1)  # the tenant's rate limit holds the batch back: one line a minute
    batch = await submit(client, jsonl(*[chat_line(f"c{i}") for i in range(4)]))
    await wait_for(client, batch.id, {"in_progress"})
    deadline = time.monotonic() + 10
    while len(gw.events_for(tid)) < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = await wait_for(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 3)
    errors = await lines_of(client, done.error_file_id)
    assert {ln["error"]["code"] for ln in errors} == {"batch_cancelled"}
    assert len(gw.events_for(tid)) == 1  # rate limited lines were never run nor billed
    assert (await client.batches.cancel(batch.id)).status == "cancelled"  # idempotent
    finished = await wait_for(
        client, (await submit(client, jsonl(chat_line("z")))).id, {"completed", "in_progress"}
    )
    if finished.status == "completed":
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(finished.id)


async def test_a_spent_budget_fails_lines_not_the_batch(gw: Gateway, worker: FakeWorker) -> None:
    tid, client = new_client(gw)
    await set_limits(gw, tid, budget={"unit": "tokens", "amount": 10})  # less than one request's worst case
    done = await wait_for(client, (await submit(client, jsonl(chat_line("a", max_tokens=50)))).id)
    assert done.status == "completed"
    [line] = await lines_of(client, done.error_file_id)
    assert line["response"]["status_code"] == 429
    assert line["response"]["body"]["error"]["code"] == "insufficient_quota"
    assert gw.events_for(tid) == []


async def test_batch_lines_wait_for_live_traffic(
    fake: FakeWorker, worker: FakeWorker, tmp_path: Path
) -> None:
    async with guarded_gateway(tmp_path, [(MODEL, "f0", fake.url)], env=FAST) as g:
        t, _key, api_key = g.new_tenant()
        client = g.client(api_key)
        worker.behave(delay_s=0.1, tokens=8)  # a live stream of ~1 s
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "live"}], stream=True
        )
        batch = await submit(client, jsonl(chat_line("b1"), chat_line("b2")))
        live_chunks = [c async for c in stream]
        live_ended = time.monotonic()
        assert live_chunks
        done = await wait_for(client, batch.id)
        assert done.status == "completed"
        batch_reqs = [r for r in worker.completion_requests() if not r.body.get("stream")]
        assert len(batch_reqs) == 2
        assert all(r.started_at >= live_ended - 0.05 for r in batch_reqs)
        assert t.id


async def test_a_batch_survives_a_gateway_restart(
    fake: FakeWorker, worker: FakeWorker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    workers = [(MODEL, "f0", fake.url)]
    worker.behave(answer_delay_s=0.3)
    lines = [chat_line(f"r{i}") for i in range(5)]
    async with run_gateway(tmp_path, workers) as first:
        t, _key, api_key = first.new_tenant()
        batch = await submit(first.client(api_key), jsonl(*lines))
        deadline = time.monotonic() + 10
        while len(first.events_for(t.id)) < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    # stopped mid-batch (the line in flight finishes within the grace); a new process carries on
    async with run_gateway(tmp_path, workers) as second:
        client = second.client(api_key)
        done = await wait_for(client, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None and done.request_counts.completed == 5
        out = await lines_of(client, done.output_file_id)
        assert [ln["custom_id"] for ln in out] == [f"r{i}" for i in range(5)]
        rids = [ln["response"]["request_id"] for ln in out]
        assert sorted(e.event.request_id for e in second.events_for(t.id)) == sorted(rids)
        sent = [str(r.headers.get("x-request-id")) for r in worker.completion_requests()]
        assert sorted(sent) == sorted(rids)  # each line reached the worker exactly once


async def test_batch_usage_is_invoiced_at_the_discount_on_its_own_lines(
    fake: FakeWorker, worker: FakeWorker, tmp_path: Path
) -> None:
    shutil.copytree(
        REPO / "configs" / "billing", tmp_path / "billing"
    )  # the shipped book: batch_discount 0.5
    async with guarded_gateway(tmp_path, [(MODEL, "f0", fake.url)], env=FAST) as g:
        tid = f"t-batch-{uuid.uuid4().hex[:8]}"
        g.tenants.create_tenant(
            id=tid, name="Batch Buyer", billing_country="DE", currency="USD", tax_id="DE811907980"
        )
        _key, api_key = g.tenants.create_key(tid, name="k")
        client = g.client(api_key)
        live = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert live.usage is not None
        done = await wait_for(client, (await submit(client, jsonl(chat_line("a"), chat_line("b")))).id)
        assert done.status == "completed"
        period = {"period": date.today().strftime("%Y-%m"), "tenant": tid}
        run = await g.http.post("/admin/v1/invoices/run", headers=ADMIN, json=period)
        assert run.status_code == 200, run.text
        final = await g.http.post(
            "/admin/v1/invoices/finalize", headers=ADMIN, json={**period, "force": True}
        )
        assert final.status_code == 200, final.text
        [doc] = final.json()["finalized"]
        shown = await g.http.get(f"/admin/v1/invoices/{doc['number']}", headers=ADMIN)
        lines = {(ln["kind"], ln["token_type"]): ln for ln in shown.json()["lines"]}
        for token_type in ("input", "output"):
            usage, batch = lines[("usage", token_type)], lines[("batch_usage", token_type)]
            assert Decimal(batch["unit_price_per_million"]) * 2 == Decimal(usage["unit_price_per_million"])
        # the fake answers 31 prompt and 3 completion tokens per request: 1 live, 2 batch
        assert (
            lines[("usage", "output")]["quantity_tokens"],
            lines[("batch_usage", "output")]["quantity_tokens"],
        ) == (3, 6)
