import csv
import io
import json
from collections.abc import Callable
from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.documents import Invoice
from billing.engine import UsageQuantity, build_credit_note, finalize
from billing.errors import InvalidUsage
from billing.parties import Buyer
from billing.render.report import render_report
from billing.reports import aggregate_exports, credit_rows, rated_rows, split
from metering.events import TokenType

S = "smollm2-135m-instruct"
USAGE = [
    UsageQuantity(S, TokenType.OUTPUT, 7_000_000, "KZ", "ru"),
    UsageQuantity(S, TokenType.OUTPUT, 3_000_000, "UZ", "uz"),
]


def test_split_is_exact_and_gives_the_cent_to_the_largest() -> None:
    assert split(Decimal("341.51"), [Decimal("48.00"), Decimal("0.05"), Decimal("0.05")], "CNY") == [
        Decimal("340.79"),
        Decimal("0.36"),
        Decimal("0.36"),
    ]
    assert split(Decimal("1.00"), [Decimal(1)] * 3, "USD") == [
        Decimal("0.34"),
        Decimal("0.33"),
        Decimal("0.33"),
    ]
    assert split(Decimal("5"), [], "USD") == []
    assert split(Decimal("0.00"), [Decimal(1), Decimal(-1)], "USD") == [Decimal("0.00"), Decimal("0.00")]
    assert split(Decimal("100"), [Decimal(1), Decimal(3)], "JPY") == [Decimal("25"), Decimal("75")]


@given(
    total=st.decimals(min_value=-10_000, max_value=10_000, places=2),
    weights=st.lists(st.integers(0, 10**9), min_size=1, max_size=8),
)
def test_split_always_sums_to_the_total(total: Decimal, weights: list[int]) -> None:
    shares = split(total, [Decimal(w) for w in weights], "USD")
    assert sum(shares) == total and len(shares) == len(weights)


def _invoice(january: Callable[..., Invoice], make_buyer: Callable[..., Buyer], **kw: object) -> Invoice:
    return finalize(january(USAGE, make_buyer("KZ", "940140000385"), **kw), "TP-INV-2026-000001")


def test_rows_follow_origin_and_ledger(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> None:
    inv = _invoice(january, make_buyer)  # 10M x 0.040 = 0.40 USD; ledger 0.40 x 7.0830 = 2.8332 -> 2.83 CNY
    rows = rated_rows(inv, USAGE)
    assert [(r.origin_country, r.revenue, r.revenue_cny) for r in rows] == [
        ("KZ", Decimal("0.28"), Decimal("1.98")),
        ("UZ", Decimal("0.12"), Decimal("0.85")),
    ]
    assert rows[0].cny_rate == Decimal("7.0830") and rows[0].fx_date == date(2026, 1, 1)
    assert rows[0].period == "2026-01" and rows[0].fx_source == "sample:PBOC-central-parity"
    with pytest.raises(InvalidUsage, match="do not match"):
        rated_rows(inv, USAGE[:1])
    with pytest.raises(InvalidUsage, match="finalized invoices"):
        rated_rows(january(USAGE, make_buyer("KZ", "940140000385")), USAGE)


def test_adjustment_rows_and_cny_invoices(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> None:
    late = [UsageQuantity(S, TokenType.OUTPUT, 1_000_000, "TR", "tr")]
    inv = finalize(
        january(USAGE, make_buyer("CN", "91110000600037341L", currency="CNY"), adjustments=late), "N-1"
    )
    rows = rated_rows(inv, USAGE, late)
    assert [(r.origin_country, r.adjustment, r.revenue, r.revenue_cny) for r in rows] == [
        ("KZ", False, Decimal("2.10"), Decimal("2.10")),
        ("UZ", False, Decimal("0.90"), Decimal("0.90")),
        ("TR", True, Decimal("0.30"), Decimal("0.30")),
    ]
    assert rows[0].fx_source == "identity" and rows[0].fx_date is None


def test_credit_rows_need_a_number(january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]) -> None:
    inv = _invoice(january, make_buyer)
    draft_note = build_credit_note(inv, reason="r", issue_date=date(2026, 2, 2))
    with pytest.raises(InvalidUsage, match="credit notes"):
        credit_rows(draft_note, rated_rows(inv, USAGE))
    other = rated_rows(inv, USAGE)
    note = finalize(draft_note, "C-1")
    assert [r.revenue for r in credit_rows(note, other)] == [Decimal("-0.28"), Decimal("-0.12")]


def test_report_formats(january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]) -> None:
    report = aggregate_exports(
        rated_rows(_invoice(january, make_buyer), USAGE), period="2026-01", by="country"
    )
    data = json.loads(render_report(report, "json"))
    assert data == {
        "period": "2026-01",
        "by": "country",
        "quantity_tokens": 10_000_000,
        "revenue_cny": "2.83",
        "groups": [
            {
                "key": "KZ",
                "quantity_tokens": 7_000_000,
                "revenue_cny": "1.98",
                "revenue_by_currency": {"USD": "0.28"},
                "documents": 1,
            },
            {
                "key": "UZ",
                "quantity_tokens": 3_000_000,
                "revenue_cny": "0.85",
                "revenue_by_currency": {"USD": "0.12"},
                "documents": 1,
            },
        ],
    }
    rows = list(csv.reader(io.StringIO(render_report(report, "csv"))))
    assert rows[0][0] == "country" and rows[1] == ["KZ", "7000000", "1.98", "USD", "0.28", "1"]
    assert rows[-1][:3] == ["total", "10000000", "2.83"]
    html = render_report(report, "html", language="zh")
    assert '<html lang="zh" dir="ltr">' in html and "¥2.83" in html and "7,000,000" in html
    with pytest.raises(ValueError, match="unknown report format"):
        render_report(report, "xlsx")
    with pytest.raises(ValueError):
        aggregate_exports([], period="2026-01", by="planet")


def test_batch_usage_is_reported_from_its_own_lines(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> None:
    batch = [UsageQuantity(S, TokenType.OUTPUT, 2_000_000, "KZ", "ru", batch=True)]
    inv = finalize(january(USAGE + batch, make_buyer("KZ", "940140000385")), "TP-INV-2026-000001")
    assert {line.kind.value for line in inv.lines} == {"usage", "batch_usage"}
    rows = rated_rows(inv, USAGE + batch)
    assert sum(r.quantity_tokens for r in rows) == 12_000_000
    assert sum(r.revenue for r in rows) == inv.subtotal
    aggregate_exports(rows, period="2026-01", by="country")
