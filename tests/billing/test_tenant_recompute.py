"""Trust (issue 13): an invoice lists the ledger events it bills (runs of `tenant_seq`), in JSON, and
carries their digest in UBL and CSV; a tenant recomputes `usage_digest` from the rows the usage API
hands out (metering/verify.py `event_row`, the tenant's view) and nothing else — the README's snippet."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from month_world import World, make_world

from metering.clock import Period
from metering.verify import event_row

DEC, JAN = Period(2025, 12), Period(2026, 1)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def recompute(invoice_json: dict[str, Any], usage_rows: list[dict[str, Any]]) -> str:
    """What the README tells a tenant to run: the rows of /v1/usage/events, the invoice's JSON."""
    wanted = invoice_json["billed_events"]["tenant_seq_ranges"]
    hashes = [r["hash"] for r in usage_rows if any(a <= r["tenant_seq"] <= b for a, b in wanted)]
    assert len(hashes) == invoice_json["billed_events"]["count"]
    return "sha256:" + hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def test_a_tenant_recomputes_the_usage_digest_from_its_usage_rows(world: World) -> None:
    world.use("kz-bank", date(2025, 12, 5), prompt=1000, completion=10)
    world.use("ru-soft", date(2025, 12, 6), prompt=500)  # another tenant's event in between
    world.use("kz-bank", date(2025, 12, 7), prompt=2000)
    world.clock.now = datetime(2026, 1, 2, 9, tzinfo=UTC)
    world.svc.run(DEC)
    world.svc.finalize(DEC)
    world.use("kz-bank", date(2025, 12, 30), prompt=300)  # late: billed in January
    world.use("kz-bank", date(2026, 1, 3), prompt=400)
    world.clock.now = datetime(2026, 2, 2, 9, tzinfo=UTC)
    [jan] = world.svc.run(JAN, tenant_id="kz-bank").drafts
    doc = world.svc.store.get(jan.ref).document
    assert doc is not None
    assert doc["billed_events"] == {"tenant_seq_ranges": [[3, 4]], "count": 2}
    rows = [event_row(s, tenant_view=True) for s in world.usage.iter_events(tenant_id="kz-bank")]
    assert recompute(doc, rows) == doc["usage_digest"]
    dec_doc = next(r for r in world.svc.store.find(period=str(DEC), tenant_id="kz-bank")).document
    assert dec_doc is not None and dec_doc["billed_events"]["tenant_seq_ranges"] == [[1, 2]]
    assert recompute(dec_doc, rows) == dec_doc["usage_digest"]
    with pytest.raises(AssertionError):  # a row held back: the count no longer matches
        recompute(doc, rows[:-1])
