"""issue 13, corrections: void -> credit note -> re-issue. The voided usage becomes billable again, on a new
invoice with the corrected tenant data; it is never billed twice. Each test fails on the code before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from month_world import FEB, JAN, NOW, World, invoice_of, january, line_tokens, make_world
from sqlalchemy import text

from billing.errors import DocumentStateError


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_void_then_reissue_bills_the_same_usage_with_corrected_data(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    old = next(r for r in world.svc.finalize(JAN).finalized if r.tenant_id == "kz-bank")
    before = invoice_of(world, old.number or "")
    world.clock.now = NOW + timedelta(days=3)
    world.svc.void(old.number or "", reason="buyer name was wrong")
    with world.engine.begin() as conn:  # the tenant's legal name is corrected
        conn.execute(text("UPDATE tenants SET name = 'Almaty Bank JSC (corrected)' WHERE id = 'kz-bank'"))
    new = world.svc.reissue(old.number or "")
    after = invoice_of(world, new.number or "")
    assert new.number == "TP-INV-2026-000005" and new.status == "finalized" and new.period == "2026-01"
    assert after.buyer.name == "Almaty Bank JSC (corrected)" and after.issue_date == date(2026, 2, 5)
    assert line_tokens(after) == line_tokens(before) == world.ledger_tokens("kz-bank", JAN)
    assert after.total == before.total and new.usage_digest == old.usage_digest
    assert world.svc.verify(new.number or "").ok
    assert world.svc.store.get(old.number or "").status == "void"  # the voided invoice stays as it was
    with pytest.raises(DocumentStateError, match="already invoiced"):  # billed once: no second re-issue
        world.svc.reissue(old.number or "")
    with pytest.raises(DocumentStateError, match="only a voided invoice can be re-issued"):
        world.svc.reissue(new.number or "")


def test_voided_usage_waits_for_its_reissue_and_is_billed_once(world: World) -> None:
    january(world)
    world.svc.run(JAN)
    old = next(r for r in world.svc.finalize(JAN).finalized if r.tenant_id == "sa-retail")
    world.svc.void(old.number or "", reason="wrong tax id")
    world.clock.now = NOW.replace(month=3)
    feb = world.svc.run(FEB)  # January's voided usage is not pulled into February as late usage
    assert "sa-retail" not in {r.tenant_id for r in feb.drafts}
    assert world.svc.run(JAN, tenant_id="sa-retail").drafts  # a re-issue is a tenant run of the period
    again = world.svc.finalize(JAN, tenant_id="sa-retail").finalized
    assert [r.tenant_id for r in again] == ["sa-retail"]
    assert line_tokens(invoice_of(world, again[0].number or "")) == world.ledger_tokens("sa-retail", JAN)
    assert world.svc.run(JAN, tenant_id="sa-retail").drafts == []  # nothing left: billed once
