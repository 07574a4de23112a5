"""A wrong FX rate is corrected by a superseding row with a reason, never edited (issue 13, guards):
issued invoices keep the rate they recorded, drafts built afterwards use the correction."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from month_world import World, make_world

from billing.errors import FxImportError
from billing.fx import FxRate
from metering.clock import Period

DEC = Period(2025, 12)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def sar_rate(world: World, ref: str) -> Decimal:
    doc = world.svc.store.get(ref).document
    assert doc is not None
    return Decimal(next(f["rate"] for f in doc["fx"] if f["purpose"] == "tax_currency"))


def test_a_superseding_rate_is_used_by_later_drafts_and_issued_invoices_keep_theirs(world: World) -> None:
    world.use("sa-retail", date(2025, 12, 5), prompt=1_000_000, origin="SA")
    world.clock.now = datetime(2026, 1, 2, 9, tzinfo=UTC)
    world.svc.run(DEC)
    [issued] = world.svc.finalize(DEC).finalized
    used = sar_rate(world, issued.ref)
    on = date(2025, 12, 31)
    wrong = next(r for r in world.svc.config().fx.rates if (r.date, r.base, r.quote) == (on, "USD", "SAR"))
    assert used == wrong.rate
    old = world.svc.supersede_fx(
        FxRate(on, "USD", "SAR", Decimal("3.7510"), "SAMA"), reason="typo in the feed"
    )
    assert old.rate == wrong.rate
    assert world.svc.config().fx.rate("USD", "SAR", on).rate == Decimal("3.7510")
    assert sar_rate(world, issued.ref) == used  # the issued invoice keeps its rate
    [(rate, supersedes, reason)] = world.svc.store.fx_corrections()
    assert (rate.rate, supersedes, reason) == (Decimal("3.7510"), str(wrong.rate), "typo in the feed")
    # a void and re-issue builds a new invoice with the corrected rate
    world.svc.void(issued.ref, reason="FX corrected")
    again = world.svc.reissue(issued.ref)
    assert sar_rate(world, again.ref) == Decimal("3.7510")


def test_a_correction_is_checked_like_an_import(world: World) -> None:
    on = date(2025, 12, 31)
    with pytest.raises(FxImportError, match="outside"):
        world.svc.supersede_fx(FxRate(on, "USD", "SAR", Decimal("1E+400"), "x"), reason="r")
    with pytest.raises(FxImportError, match="needs a reason"):
        world.svc.supersede_fx(FxRate(on, "USD", "SAR", Decimal("3.75"), "x"), reason=" ")
    with pytest.raises(FxImportError, match="a correction supersedes an existing rate"):
        world.svc.supersede_fx(FxRate(date(2025, 12, 15), "USD", "SAR", Decimal("3.75"), "x"), reason="r")
    with pytest.raises(FxImportError, match="both USD"):
        world.svc.supersede_fx(FxRate(on, "USD", "USD", Decimal("2"), "x"), reason="r")
