"""One month (January 2026) of usage from tenants in several countries, every amount by hand.

Prices (USD per 1M tokens, written below): qwen input graduated 0.30 up to 100M then 0.24; qwen cached
input 0.075; qwen output volume 0.90 up to 50M, 0.80 up to 500M; smollm2 input 0.02, output 0.04.
FX: USD/CNY 7.1000 on 2026-01-01 (CN ledger: first of month), USD/SAR 3.7500 on 2026-01-31 (SA: tax
point = period end).
"""

from collections.abc import Callable
from dataclasses import replace
from datetime import date
from decimal import Decimal

import pytest

from billing import fx, price_book
from billing.documents import DocumentStatus, FxUse, Invoice
from billing.engine import UsageQuantity, build_credit_note, build_invoice, finalize, usage_digest
from billing.parties import Buyer, Seller
from billing.reports import GroupBy, aggregate_exports, credit_rows, rated_rows
from billing.tax import TaxRules
from metering.events import TokenType

Q, S = "qwen2.5-7b-instruct", "smollm2-135m-instruct"
IN, CA, OUT = TokenType.INPUT, TokenType.CACHED_INPUT, TokenType.OUTPUT

PRICES = price_book.parse(
    {
        "price_books": [
            {
                "version": "test-2026",
                "effective_from": "2026-01-01",
                "currencies": {
                    "USD": {
                        "models": {
                            Q: {
                                "input": {
                                    "mode": "graduated",
                                    "tiers": [
                                        {"up_to": 100_000_000, "price": "0.30"},
                                        {"up_to": None, "price": "0.24"},
                                    ],
                                },
                                "cached_input": "0.075",
                                "output": {
                                    "mode": "volume",
                                    "tiers": [
                                        {"up_to": 50_000_000, "price": "0.90"},
                                        {"up_to": 500_000_000, "price": "0.80"},
                                        {"up_to": None, "price": "0.70"},
                                    ],
                                },
                            },
                            S: {"input": "0.02", "cached_input": "0.01", "output": "0.04"},
                        }
                    }
                },
            }
        ],
        "contracts": [
            {
                "id": "uz-min",
                "tenant": "t-uz",
                "currency": "USD",
                "effective_from": "2026-01-01",
                "minimum_commitment": "100.00",
            }
        ],
    }
)
RATES = fx.FxTable(
    tuple(
        fx.import_csv(
            "date,base,quote,rate,source\n"
            "2026-01-01,USD,CNY,7.1000,test:PBOC\n"
            "2026-01-31,USD,SAR,3.7500,test:SAMA\n"
        )
    )
)

USAGE: dict[str, list[UsageQuantity]] = {
    "t-kz": [
        UsageQuantity(Q, IN, 80_000_000, "KZ", "ru"),
        UsageQuantity(Q, IN, 40_000_000, "KZ", "kk"),
        UsageQuantity(Q, OUT, 30_000_000, "KZ", "ru"),
        UsageQuantity(Q, CA, 10_000_000, "KZ", "ru"),
    ],
    "t-sa": [
        UsageQuantity(Q, OUT, 60_000_000, "SA", "ar"),
        UsageQuantity(S, IN, 2_500_000, "SA", "ar"),
        UsageQuantity(S, OUT, 1_234_567, "SA", "ar"),
    ],
    "t-ru": [
        UsageQuantity(Q, IN, 30_000_000, "RU", "ru"),
        UsageQuantity(Q, IN, 20_000_000, "BY", "ru"),
        UsageQuantity(Q, OUT, 10_000_000, "RU", "ru"),
    ],
    "t-ae": [UsageQuantity(S, IN, 1_000_000, "AE", "ar"), UsageQuantity(S, OUT, 3_000_000, "AE", "ar")],
    "t-uz": [UsageQuantity(S, OUT, 10_000_000, "UZ", "uz")],
}
BUYERS = {
    "t-kz": Buyer("t-kz", "Almaty Data LLP", "KZ", "940140000385", True, "USD", "ru"),
    "t-sa": Buyer("t-sa", "Riyadh AI Co.", "SA", "300000000000003", True, "USD", "ar"),
    "t-ru": Buyer("t-ru", "ООО Ромашка", "RU", "7707083893", True, "USD", "ru"),
    "t-ae": Buyer("t-ae", "Layla Consumer", "AE", None, False, "USD", "ar"),
    "t-uz": Buyer("t-uz", "Tashkent Tech", "UZ", "302936161", True, "USD", "en"),
}


@pytest.fixture(scope="module")
def invoices(seller: Seller, tax_rules: TaxRules) -> dict[str, Invoice]:
    out = {}
    for n, (tenant, usage) in enumerate(USAGE.items(), 1):
        draft = build_invoice(
            usage=usage,
            buyer=BUYERS[tenant],
            seller=seller,
            price_book=PRICES,
            tax_rules=tax_rules,
            fx=RATES,
            period_start=date(2026, 1, 1),
            period_end=date(2026, 1, 31),
            issue_date=date(2026, 2, 1),
            usage_digest=usage_digest(usage),
        )
        out[tenant] = finalize(draft, f"TP-INV-2026-{n:06d}")
    return out


def amounts(invoice: Invoice) -> list[tuple[str, str, int, str, str]]:
    return [
        (
            line.model or "-",
            line.token_type.value if line.token_type else "-",
            line.quantity_tokens,
            str(line.unit_price_per_million),
            str(line.amount),
        )
        for line in invoice.lines
    ]


def test_kz_business_reverse_charge(invoices: dict[str, Invoice]) -> None:
    inv = invoices["t-kz"]
    assert amounts(inv) == [
        (Q, "input", 100_000_000, "0.30", "30.00"),  # graduated tier 1
        (Q, "input", 20_000_000, "0.24", "4.80"),  # graduated tier 2
        (Q, "cached_input", 10_000_000, "0.075", "0.75"),
        (Q, "output", 30_000_000, "0.90", "27.00"),  # volume tier 1 (<= 50M)
    ]
    assert (inv.subtotal, inv.tax_total, inv.total) == (Decimal("62.55"), Decimal("0.00"), Decimal("62.55"))
    [tax] = inv.taxes
    assert (tax.treatment, tax.rate, tax.statutory_rate) == ("reverse_charge", Decimal(0), Decimal("16"))
    assert inv.tax_rule_id == "KZ-VAT-2026" and inv.tax_point == date(2026, 1, 31)
    # ledger: 62.55 x 7.1 = 444.105 -> 444.11 CNY, zero-rated export in the seller's books
    assert (inv.ledger.treatment, inv.ledger.net_amount) == ("zero_rated_export", Decimal("444.11"))
    assert inv.fx == (
        FxUse(
            from_currency="USD",
            to_currency="CNY",
            rate=Decimal("7.1000"),
            source="test:PBOC",
            date=date(2026, 1, 1),
            purpose="ledger",
        ),
    )


def test_sa_business_reverse_charge_with_sar(invoices: dict[str, Invoice]) -> None:
    inv = invoices["t-sa"]
    assert amounts(inv) == [
        (Q, "output", 60_000_000, "0.80", "48.00"),  # volume: all 60M at tier 2
        (S, "input", 2_500_000, "0.02", "0.05"),
        (S, "output", 1_234_567, "0.04", "0.05"),  # 0.04938268 -> 0.05
    ]
    assert inv.lines[2].amount_unrounded == Decimal("0.04938268")
    assert (inv.subtotal, inv.total) == (Decimal("48.10"), Decimal("48.10"))
    [tax] = inv.taxes
    assert (tax.treatment, tax.statutory_rate, tax.amount) == (
        "reverse_charge",
        Decimal("15"),
        Decimal("0.00"),
    )
    # 48.10 x 3.75 = 180.375 -> 180.38 SAR taxable, 0.00 SAR VAT
    assert (tax.tax_currency, tax.tax_currency_taxable_amount, tax.tax_currency_amount) == (
        "SAR",
        Decimal("180.38"),
        Decimal("0.00"),
    )
    assert [(f.to_currency, f.rate, f.date, f.source) for f in inv.fx] == [
        ("SAR", Decimal("3.7500"), date(2026, 1, 31), "test:SAMA"),
        ("CNY", Decimal("7.1000"), date(2026, 1, 1), "test:PBOC"),
    ]
    assert inv.ledger.net_amount == Decimal("341.51")  # 48.10 x 7.1


def test_ru_business_supplier_charges_22(invoices: dict[str, Invoice]) -> None:
    inv = invoices["t-ru"]
    assert amounts(inv) == [
        (Q, "input", 50_000_000, "0.30", "15.00"),
        (Q, "output", 10_000_000, "0.90", "9.00"),
    ]
    [tax] = inv.taxes
    assert (tax.treatment, tax.rate, tax.taxable_amount, tax.amount) == (
        "supplier_charges",
        Decimal("22"),
        Decimal("24.00"),
        Decimal("5.28"),
    )
    assert inv.total == Decimal("29.28")
    assert inv.seller.vat_id == "RU9909000004" and inv.tax_rule_id == "RU-VAT-2026"
    assert inv.ledger.net_amount == Decimal("170.40")


def test_ae_consumer_not_collecting(invoices: dict[str, Invoice]) -> None:
    inv = invoices["t-ae"]
    assert amounts(inv) == [(S, "input", 1_000_000, "0.02", "0.02"), (S, "output", 3_000_000, "0.04", "0.12")]
    [tax] = inv.taxes
    assert (tax.treatment, tax.rate, tax.statutory_rate, tax.amount) == (
        "not_collecting",
        Decimal(0),
        Decimal("5"),
        Decimal("0.00"),
    )
    assert tax.tax_currency is None and "does not collect tax in AE" in tax.note
    assert (inv.subtotal, inv.total) == (Decimal("0.14"), Decimal("0.14"))
    assert (inv.ledger.treatment, inv.ledger.net_amount) == ("not_collecting", Decimal("0.99"))  # 0.994


def test_uz_tax_agent_with_minimum_commitment(invoices: dict[str, Invoice]) -> None:
    inv = invoices["t-uz"]
    assert amounts(inv) == [(S, "output", 10_000_000, "0.04", "0.40"), ("-", "-", 0, "None", "99.60")]
    assert inv.contract_id == "uz-min" and inv.taxes[0].treatment == "tax_agent"
    assert (inv.subtotal, inv.total, inv.ledger.net_amount) == (
        Decimal("100.00"),
        Decimal("100.00"),
        Decimal("710.00"),
    )


def test_credit_note_reverses_exactly(invoices: dict[str, Invoice]) -> None:
    inv = invoices["t-ru"]
    note = finalize(
        build_credit_note(inv, reason="Duplicate billing", issue_date=date(2026, 2, 15)), "TP-CRN-2026-000001"
    )
    assert note.status is DocumentStatus.FINALIZED and note.original_number == inv.number
    assert (note.lines, note.taxes, note.fx) == (inv.lines, inv.taxes, inv.fx)
    assert (note.subtotal, note.tax_total, note.total) == (
        Decimal("24.00"),
        Decimal("5.28"),
        Decimal("29.28"),
    )
    assert note.ledger == inv.ledger
    rows = rated_rows(inv, USAGE["t-ru"])
    reversed_rows = credit_rows(note, rows)
    assert sum(r.revenue for r in rows + reversed_rows) == 0
    assert sum(r.revenue_cny for r in rows + reversed_rows) == 0
    report = aggregate_exports(rows + reversed_rows, period="2026-01", by="country")
    assert {(g.key, g.quantity_tokens, g.revenue_cny) for g in report.groups} == {
        ("RU", 0, Decimal("0.00")),
        ("BY", 0, Decimal("0.00")),
    }


@pytest.fixture(scope="module")
def month_rows(invoices: dict[str, Invoice]) -> list:  # type: ignore[type-arg]
    return [row for tenant, inv in invoices.items() for row in rated_rows(inv, USAGE[tenant])]


def test_report_by_destination_country(month_rows: list) -> None:  # type: ignore[type-arg]
    report = aggregate_exports(month_rows, period="2026-01", by=GroupBy.COUNTRY)
    # t-ru CNY 170.40 split by revenue 9.00 (RU input) / 6.00 (BY input) / 9.00 (RU output)
    # t-uz CNY 710.00 split by 0.40 (UZ usage) / 99.60 (minimum top-up, unattributed)
    assert [(g.key, g.quantity_tokens, str(g.revenue_cny)) for g in report.groups] == [
        ("unattributed", 0, "707.16"),
        ("KZ", 160_000_000, "444.11"),
        ("SA", 63_734_567, "341.51"),
        ("RU", 40_000_000, "127.80"),
        ("BY", 20_000_000, "42.60"),
        ("UZ", 10_000_000, "2.84"),
        ("AE", 4_000_000, "0.99"),
    ]
    assert report.revenue_cny == Decimal("1667.01")  # 444.11 + 341.51 + 170.40 + 0.99 + 710.00
    assert dict(report.groups[3].revenue_by_currency) == {"USD": Decimal("18.00")}


def test_report_by_tenant_model_language(month_rows: list) -> None:  # type: ignore[type-arg]
    by_tenant = aggregate_exports(month_rows, period="2026-01", by="tenant")
    assert {g.key: str(g.revenue_cny) for g in by_tenant.groups} == {
        "t-kz": "444.11",
        "t-sa": "341.51",
        "t-ru": "170.40",
        "t-ae": "0.99",
        "t-uz": "710.00",
    }
    # t-sa's 341.51 split over 48.00 / 0.05 / 0.05: 340.80 + 0.36 + 0.36 = 341.52, so the largest
    # share gives back the cent: 340.79
    by_model = aggregate_exports(month_rows, period="2026-01", by="model")
    assert {g.key: str(g.revenue_cny) for g in by_model.groups} == {
        Q: "955.30",
        S: "4.55",
        "unattributed": "707.16",
    }
    # t-kz 444.11 over 23.20 (input ru) / 11.60 (input kk) / 0.75 (cached ru) / 27.00 (output ru)
    # = 164.72 / 82.36 / 5.33 / 191.70
    by_language = aggregate_exports(month_rows, period="2026-01", by="language")
    assert {g.key: str(g.revenue_cny) for g in by_language.groups} == {
        "ru": "532.15",
        "kk": "82.36",
        "ar": "342.50",
        "uz": "2.84",
        "unattributed": "707.16",
    }
    assert aggregate_exports(month_rows, period="2026-02", by="language").groups == ()


def test_same_inputs_same_invoice(seller: Seller, tax_rules: TaxRules, invoices: dict[str, Invoice]) -> None:
    usage = list(reversed(USAGE["t-kz"]))
    again = build_invoice(
        usage=usage,
        buyer=BUYERS["t-kz"],
        seller=seller,
        price_book=PRICES,
        tax_rules=tax_rules,
        fx=RATES,
        period_start=date(2026, 1, 1),
        period_end=date(2026, 1, 31),
        issue_date=date(2026, 2, 1),
        usage_digest=usage_digest(usage),
    )
    assert finalize(again, invoices["t-kz"].number or "") == invoices["t-kz"]
    assert usage_digest(usage) == usage_digest(USAGE["t-kz"])
    assert usage_digest(usage[1:]) != usage_digest(USAGE["t-kz"])


def test_sa_registered_consumer_vat_in_sar(
    seller: Seller, tax_rules: TaxRules, with_registration: Callable[[Seller, str, str], Seller]
) -> None:
    usage = [UsageQuantity(Q, IN, 100_000_000, "SA", "ar")]
    inv = build_invoice(
        usage=usage,
        buyer=replace(BUYERS["t-sa"], tax_id=None, business=False),
        seller=with_registration(seller, "SA", "310000000000003"),
        price_book=PRICES,
        tax_rules=tax_rules,
        fx=RATES,
        period_start=date(2026, 1, 1),
        period_end=date(2026, 1, 31),
        issue_date=date(2026, 2, 1),
        usage_digest="d",
    )
    [tax] = inv.taxes
    # 30.00 USD x 15 % = 4.50 USD; SAR: 30.00 x 3.75 = 112.50, x 15 % = 16.875 -> 16.88
    assert (tax.amount, tax.tax_currency_taxable_amount, tax.tax_currency_amount) == (
        Decimal("4.50"),
        Decimal("112.50"),
        Decimal("16.88"),
    )
    assert inv.total == Decimal("34.50")
    assert inv.fx[0].rate == Decimal("3.7500") and inv.fx[0].purpose == "tax_currency"


def test_report_by_buyer_country_and_csv_without_double_counts(month_rows: list) -> None:  # type: ignore[type-arg]
    """Issue 13: the CN export filing groups by the buyer's country (the tenant's billing_country), not
    by where requests came from; and no format repeats a group's totals on its currency rows."""
    import csv
    import io
    import json

    from billing.render.report import render_report

    by_buyer = aggregate_exports(month_rows, period="2026-01", by="buyer_country")
    by_origin = aggregate_exports(month_rows, period="2026-01", by="country")
    assert {g.key: str(g.revenue_cny) for g in by_buyer.groups} == {
        "KZ": "444.11",
        "SA": "341.51",
        "RU": "170.40",  # its BY-origin usage is still a sale to a Russian buyer
        "AE": "0.99",
        "UZ": "710.00",  # the minimum top-up has a buyer, not an origin
    }
    assert by_buyer.revenue_cny == by_origin.revenue_cny == Decimal("1667.01")
    from dataclasses import replace

    # a buyer country invoiced in two currencies (a second KZ tenant in EUR): two rows, each its share
    mixed = [
        replace(r, currency="EUR") if i % 2 and r.tenant_id == "t-kz" else r for i, r in enumerate(month_rows)
    ]
    by_currency = aggregate_exports(mixed, period="2026-01", by="buyer_country")
    kz = next(g for g in by_currency.groups if g.key == "KZ")
    assert [s.currency for s in kz.shares] == ["EUR", "USD"]
    assert sum(s.quantity_tokens for s in kz.shares) == kz.quantity_tokens
    for report in (by_buyer, by_origin, by_currency):
        rows = list(csv.DictReader(io.StringIO(render_report(report, "csv"))))
        *groups, total = rows
        assert total[report.by.value] == "total"
        assert sum(int(r["quantity_tokens"]) for r in groups) == int(total["quantity_tokens"])
        assert sum(Decimal(r["revenue_cny"]) for r in groups) == Decimal(total["revenue_cny"])
        data = json.loads(render_report(report, "json"))
        assert sum(Decimal(g["revenue_cny"]) for g in data["groups"]) == Decimal(data["revenue_cny"])
        html = render_report(report, "html")
        assert html.count("<tr") == len(report.groups) + 2  # header, one per group, total
