"""Embeddings usage through billing: an `embeddings` event is billed as `embedding_input` tokens at
the embedding model's own price, on its own invoice line (rendered in the buyer's language and in
the CSV), and counted in the exports report."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from metering.events import Outcome, UsageEvent
from tests.billing.month_world import JAN, S, World, invoice_of, line_tokens, make_world


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


E = "smollm2-135m-embed"


def embeddings_event(tenant: str, day: int, tokens: int) -> UsageEvent:
    when = datetime(2026, 1, day, 12, tzinfo=UTC)
    return UsageEvent(
        request_id="req_" + uuid.uuid4().hex,
        tenant_id=tenant,
        key_id="key_t",
        model=E,
        endpoint="embeddings",
        origin_country="KZ",
        prompt_tokens=tokens,
        cached_prompt_tokens=0,
        completion_tokens=0,
        stream=False,
        outcome=Outcome.OK,
        started_at=when,
        finished_at=when,
    )


def test_embeddings_are_their_own_invoice_line_at_their_own_price(world: World) -> None:
    world.use("kz-bank", datetime(2026, 1, 3).date(), prompt=4_000_000, completion=1_000_000)
    world.usage.append_batch(
        [embeddings_event("kz-bank", 5, 6_000_000), embeddings_event("kz-bank", 7, 2_000_000)]
    )
    run = world.svc.run(JAN)
    assert not run.errors
    inv = invoice_of(world, "DRAFT-2026-01-kz-bank")
    assert line_tokens(inv) == {
        (S, "input"): 4_000_000,
        (S, "output"): 1_000_000,
        (E, "embedding_input"): 8_000_000,
    }
    [line] = [ln for ln in inv.lines if ln.model == E]
    assert line.unit_price_per_million == Decimal("0.005") and line.amount == Decimal("0.04")  # 8 x 0.005 USD
    html = world.svc.render("DRAFT-2026-01-kz-bank", "html").decode()
    assert "входные токены эмбеддингов" in html  # kz-bank's invoices are in Russian
    assert "embedding_input" in world.svc.render("DRAFT-2026-01-kz-bank", "csv").decode()
    world.svc.finalize(JAN)
    report = world.svc.exports(JAN, by="model")
    assert {g.key: g.quantity_tokens for g in report.groups}[E] == 8_000_000
