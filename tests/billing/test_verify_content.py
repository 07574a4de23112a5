"""`invoices verify` recomputes every billed event's hash from its content (issue 13, Trust).

Editing a billed row's outcome, key or end time in the database leaves every token count alone,
so only a hash recomputed from the row itself can notice it: verify must fail and name the event.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from month_world import JAN, World, january, make_world
from sqlalchemy import text


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


@pytest.mark.parametrize(
    "edit",
    [
        "outcome = 'client_cancelled'",
        "key_id = 'key_other'",
        "finished_at = '2026-01-09 12:00:01.000000'",
    ],
)
def test_verify_detects_an_edited_billed_row(world: World, edit: str) -> None:
    january(world)
    world.svc.run(JAN)
    fin = world.svc.finalize(JAN)
    number = next(r.number for r in fin.finalized if r.tenant_id == "sa-retail") or ""
    assert world.svc.verify(number).ok
    with world.engine.connect() as conn:
        seq, request_id = conn.execute(
            text("SELECT seq, request_id FROM usage_events WHERE tenant_id = 'sa-retail'")
        ).one()
    with world.engine.begin() as conn:
        conn.execute(text(f"UPDATE usage_events SET {edit} WHERE seq = :seq"), {"seq": seq})
    bad = world.svc.verify(number)
    assert not bad.ok
    assert any(f"seq {seq}" in p and request_id in p for p in bad.problems), bad.problems
    assert any("usage digest" in p for p in bad.problems), bad.problems
