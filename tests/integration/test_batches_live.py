"""The Batch API end to end with real parts: the official openai client -> `tokenport gateway` -> a
real vLLM worker. A batch file with good and bad lines completes; every good line is in the output
file with the worker's answer and usage, metered once in the ledger as `batch.chat.completions`
with exactly those tokens; the bad line is in the error file; a live request meanwhile is served."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from metering.db import make_engine
from metering.store_sql import UsageStore
from tests.integration.conftest import MODEL, Gateway

pytestmark = pytest.mark.integration


def line(custom_id: str, text: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8},
    }


def test_a_batch_runs_on_the_real_worker(gateway: Gateway) -> None:
    gateway.cli_json(
        "tenants",
        "create",
        "--id",
        "batch-co",
        "--name",
        "Batch Co",
        "--billing-country",
        "DE",
        "--currency",
        "USD",
    )
    key = gateway.cli_json("keys", "create", "--tenant", "batch-co")
    assert isinstance(key, dict)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key["key"], max_retries=0)
    try:
        rows = [line(f"q{i}", f"Name a colour, number {i}.") for i in range(3)]
        data = ("\n".join(json.dumps(r) for r in rows) + "\n{broken\n").encode()
        f = client.files.create(file=("batch.jsonl", data), purpose="batch")
        batch = client.batches.create(
            input_file_id=f.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"test": "live"},
        )
        assert batch.status == "validating"
        live = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert live.choices[0].message.content is not None
        deadline = time.monotonic() + 600
        while (batch := client.batches.retrieve(batch.id)).status not in (
            "completed",
            "failed",
            "expired",
            "cancelled",
        ):
            assert time.monotonic() < deadline, batch
            time.sleep(1)
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
            4,
            3,
            1,
        )
        assert batch.output_file_id and batch.error_file_id
        out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == ["q0", "q1", "q2"]
        assert [e["error"]["code"] for e in errors] == ["invalid_json_line"]
        store = UsageStore(make_engine(f"sqlite:///{gateway.data_dir / 'tokenport.db'}"))
        for o in out:
            assert o["response"]["status_code"] == 200 and o["error"] is None
            body, rid = o["response"]["body"], o["response"]["request_id"]
            assert body["choices"][0]["message"]["content"]
            stored = store.get(rid)
            assert stored is not None, rid
            e = stored.event
            assert (e.endpoint, e.tenant_id, e.model, e.outcome.value) == (
                "batch.chat.completions",
                "batch-co",
                MODEL,
                "ok",
            )
            assert (e.prompt_tokens, e.completion_tokens) == (
                body["usage"]["prompt_tokens"],
                body["usage"]["completion_tokens"],
            )
            assert not e.estimated
        batch_events = [
            s for s in store.iter_events(tenant_id="batch-co") if s.event.endpoint.startswith("batch.")
        ]
        assert len(batch_events) == 3  # one usage event per line, none for the bad line
    finally:
        client.close()
