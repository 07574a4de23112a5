"""Engine edge cases: every branch of billing/engine.py (kept at 100 % line coverage)."""

from collections.abc import Callable
from dataclasses import replace
from datetime import date
from decimal import Decimal

import pytest

from billing import fx, price_book
from billing.documents import DocumentStatus, Invoice, LineKind
from billing.engine import UsageQuantity, build_credit_note, finalize, usage_digest, void
from billing.errors import DocumentStateError, FxRateMissing, InvalidUsage, PriceMissing, TaxIdInvalid
from billing.parties import Buyer, Seller
from metering.events import TokenType

Q, S = "qwen2.5-7b-instruct", "smollm2-135m-instruct"
Build = Callable[..., Invoice]


def test_period_and_issue_date_are_checked(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    kz = make_buyer("KZ", "940140000385")
    with pytest.raises(InvalidUsage, match="before it starts"):
        january([], kz, period_end=date(2025, 12, 31))
    with pytest.raises(InvalidUsage, match="issue date"):
        january([], kz, issue_date=date(2025, 12, 31))


def test_negative_usage_is_refused_but_adjustments_may_be_negative(
    january: Build, make_buyer: Callable[..., Buyer]
) -> None:
    kz = make_buyer("KZ", "940140000385")
    with pytest.raises(InvalidUsage, match="negative usage"):
        january([UsageQuantity(S, TokenType.INPUT, -1)], kz)
    inv = january(
        [UsageQuantity(S, TokenType.OUTPUT, 10_000_000)],
        kz,
        adjustments=[
            UsageQuantity(S, TokenType.OUTPUT, -2_500_000),
            UsageQuantity(S, TokenType.INPUT, 1_000_000),
            UsageQuantity(S, TokenType.INPUT, -1_000_000),  # nets to zero: no line
        ],
    )
    # usage 10M x 0.040 = 0.40; adjustment -2.5M x 0.040 = -0.10
    assert [(line.kind, line.quantity_tokens, line.amount) for line in inv.lines] == [
        (LineKind.USAGE, 10_000_000, Decimal("0.40")),
        (LineKind.ADJUSTMENT, -2_500_000, Decimal("-0.10")),
    ]
    assert inv.lines[1].adjustment and not inv.lines[0].adjustment
    assert inv.subtotal == Decimal("0.30")
    with pytest.raises(InvalidUsage, match="credit note"):
        january([], kz, adjustments=[UsageQuantity(S, TokenType.OUTPUT, -1_000_000)])


def test_zero_usage_gives_an_empty_invoice(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    inv = january([UsageQuantity(S, TokenType.INPUT, 0)], make_buyer("KZ", "940140000385"))
    assert inv.lines == () and inv.total == Decimal("0")


def test_minimum_commitment_only_when_below(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    who = make_buyer("KZ", "940140000385", tenant="t-sample-enterprise")
    small = january([UsageQuantity(Q, TokenType.OUTPUT, 100_000_000)], who)  # contract price 0.75 -> 75.00
    assert [line.amount for line in small.lines] == [Decimal("75.00"), Decimal("425.00")]
    assert small.lines[1].kind is LineKind.MINIMUM_COMMITMENT and small.subtotal == Decimal("500.00")
    late = january(
        [UsageQuantity(Q, TokenType.OUTPUT, 100_000_000)],
        who,
        adjustments=[UsageQuantity(Q, TokenType.OUTPUT, 100_000_000)],
    )
    assert late.lines[-1].amount == Decimal("425.00")  # adjustments do not count towards the minimum
    big = january([UsageQuantity(Q, TokenType.OUTPUT, 700_000_000)], who)  # 525.00 >= 500
    assert [line.kind for line in big.lines] == [LineKind.USAGE] and big.subtotal == Decimal("525.00")
    assert big.contract_id == "sample-enterprise-2026"


def test_cny_invoice_needs_no_ledger_fx(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    cn = make_buyer("CN", "91110000600037341L", currency="CNY", language="zh")
    inv = january([UsageQuantity(S, TokenType.OUTPUT, 10_000_000)], cn)  # 10 x 0.30 = 3.00 CNY, 6 % = 0.18
    assert (inv.subtotal, inv.tax_total, inv.total) == (Decimal("3.00"), Decimal("0.18"), Decimal("3.18"))
    assert inv.fx == () and inv.ledger.net_amount == Decimal("3.00") and inv.ledger.currency == "CNY"
    assert inv.seller.vat_id == "CN91120116MA05T8QX3G"


def test_invoice_in_the_tax_currency_needs_no_tax_fx(
    january: Build,
    seller: Seller,
    make_buyer: Callable[..., Buyer],
    with_registration: Callable[[Seller, str, str], Seller],
) -> None:
    sar_book = price_book.parse(
        {
            "price_books": [
                {
                    "version": "sar",
                    "effective_from": "2026-01-01",
                    "currencies": {"SAR": {"models": {S: {"output": "0.15"}}}},
                }
            ]
        }
    )
    inv = january(
        [UsageQuantity(S, TokenType.OUTPUT, 100_000_000)],
        make_buyer("SA", currency="SAR"),
        price_book=sar_book,
        seller=with_registration(seller, "SA", "310000000000003"),
    )
    [tax] = inv.taxes
    assert (tax.amount, tax.tax_currency, tax.tax_currency_amount) == (Decimal("2.25"), None, None)
    assert [f.purpose for f in inv.fx] == ["ledger"]
    assert inv.fx[0].source.startswith("cross:USD(")  # SAR->CNY through USD on 2026-01-01


def test_errors_surface_unchanged(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    with pytest.raises(TaxIdInvalid):
        january([], make_buyer("KZ", "940140000386"))
    with pytest.raises(PriceMissing, match="gpt-9"):
        january([UsageQuantity("gpt-9", TokenType.INPUT, 1)], make_buyer("KZ", "940140000385"))
    with pytest.raises(FxRateMissing, match="USD->SAR for 2026-01-30"):
        january(
            [UsageQuantity(S, TokenType.INPUT, 1)],
            make_buyer("SA", "300000000000003"),
            period_end=date(2026, 1, 30),
        )


def test_buyer_is_normalized(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    who = replace(make_buyer("SA", "SA 300000000000003"), billing_country="sa", currency="usd", language="AR")
    inv = january([], who)
    assert (inv.buyer.billing_country, inv.buyer.tax_id, inv.currency, inv.buyer.language) == (
        "SA",
        "300000000000003",
        "USD",
        "ar",
    )
    assert inv.due_date == date(2026, 3, 3)  # 30 days after 2026-02-01


def test_finalize_is_pure_and_once(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    draft = january([UsageQuantity(S, TokenType.INPUT, 1_000_000)], make_buyer("KZ", "940140000385"))
    done = finalize(draft, "TP-INV-2026-000001")
    assert draft.status is DocumentStatus.DRAFT and draft.number is None
    assert (done.status, done.number) == (DocumentStatus.FINALIZED, "TP-INV-2026-000001")
    assert replace(done, number=None, status=DocumentStatus.DRAFT) == draft
    with pytest.raises(DocumentStateError, match="only a draft"):
        finalize(done, "TP-INV-2026-000002")
    with pytest.raises(DocumentStateError, match="needs a number"):
        finalize(draft, "  ")


def test_credit_note_rules(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    draft = january([UsageQuantity(S, TokenType.INPUT, 1_000_000)], make_buyer("KZ", "940140000385"))
    with pytest.raises(DocumentStateError, match="finalized invoice"):
        build_credit_note(draft, reason="x", issue_date=date(2026, 2, 2))
    done = finalize(draft, "TP-INV-2026-000001")
    with pytest.raises(DocumentStateError, match="reason"):
        build_credit_note(done, reason=" ", issue_date=date(2026, 2, 2))
    with pytest.raises(DocumentStateError, match="before the invoice date"):
        build_credit_note(done, reason="x", issue_date=date(2026, 1, 31))
    note = build_credit_note(done, reason="x", issue_date=date(2026, 2, 2))
    assert note.status is DocumentStatus.DRAFT and note.number is None and note.kind == "credit_note"
    assert finalize(note, "TP-CRN-2026-000001").number == "TP-CRN-2026-000001"


def test_tax_point_issue_date_policy_moves_rule_and_fx(
    seller: Seller, make_buyer: Callable[..., Buyer], shipped_prices: price_book.PriceBook
) -> None:
    from billing.engine import build_invoice
    from billing.tax import parse

    rules = parse(
        {
            "seller_country": "CN",
            "default_wording": {},
            "seller_ledger": [
                {
                    "id": "L",
                    "effective_from": "2016-01-01",
                    "b2b": "zero_rated_export",
                    "b2c": "not_collecting",
                    "fx_date_rule": "issue_date",
                }
            ],
            "countries": {
                "KZ": {
                    "tax_point": "issue_date",
                    "rules": [
                        {
                            "id": "old",
                            "effective_from": "2000-01-01",
                            "effective_to": "2026-01-31",
                            "rate": "12",
                            "b2b": "reverse_charge",
                            "b2c": "not_collecting",
                        },
                        {
                            "id": "new",
                            "effective_from": "2026-02-01",
                            "rate": "16",
                            "b2b": "reverse_charge",
                            "b2c": "not_collecting",
                        },
                    ],
                }
            },
        }
    )
    table = fx.FxTable(tuple(fx.import_csv("date,base,quote,rate,source\n2026-02-01,USD,CNY,7.2,t\n")))
    inv = build_invoice(
        usage=[],
        buyer=make_buyer("KZ", "940140000385"),
        seller=seller,
        price_book=shipped_prices,
        tax_rules=rules,
        fx=table,
        period_start=date(2026, 1, 1),
        period_end=date(2026, 1, 31),
        issue_date=date(2026, 2, 1),
        usage_digest="d",
    )
    assert (inv.tax_point, inv.tax_rule_id, inv.fx[0].date) == (date(2026, 2, 1), "new", date(2026, 2, 1))
    assert inv.taxes[0].note == ""  # no wording configured: empty, never invented


def test_void_only_finalized(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    draft = january([UsageQuantity(S, TokenType.INPUT, 1_000_000)], make_buyer("KZ", "940140000385"))
    with pytest.raises(DocumentStateError, match="only a finalized"):
        void(draft)
    voided = void(finalize(draft, "TP-INV-2026-000001"))
    assert voided.status is DocumentStatus.VOID and voided.number == "TP-INV-2026-000001"
    with pytest.raises(DocumentStateError, match="finalized invoice"):
        build_credit_note(voided, reason="x", issue_date=date(2026, 2, 2))
    assert voided.to_json_dict()["status"] == "void"


def test_tax_keeps_its_unrounded_value(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    inv = january([UsageQuantity(S, TokenType.OUTPUT, 1_234_567)], make_buyer("RU", "7707083893"))
    [tax] = inv.taxes  # 0.04938268 -> line 0.05; 22 % of 0.05 = 0.011 -> 0.01
    assert (inv.lines[0].amount, tax.amount, tax.amount_unrounded) == (
        Decimal("0.05"),
        Decimal("0.01"),
        Decimal("0.0110"),
    )


def test_batch_usage_is_discounted_on_its_own_lines(january: Build, make_buyer: Callable[..., Buyer]) -> None:
    kz = make_buyer("KZ", "940140000385")
    live = UsageQuantity(S, TokenType.OUTPUT, 10_000_000)
    batch = UsageQuantity(S, TokenType.OUTPUT, 10_000_000, batch=True)
    inv = january([live, batch, UsageQuantity(S, TokenType.INPUT, 5_000_000, batch=True)], kz)
    # the shipped book: smollm2 output 0.040, input 0.020 per 1M; batch_discount 0.5
    assert [
        (ln.kind, ln.token_type, ln.quantity_tokens, ln.unit_price_per_million, ln.amount) for ln in inv.lines
    ] == [
        (LineKind.USAGE, TokenType.OUTPUT, 10_000_000, Decimal("0.040"), Decimal("0.40")),
        (LineKind.BATCH_USAGE, TokenType.INPUT, 5_000_000, Decimal("0.0100"), Decimal("0.05")),
        (LineKind.BATCH_USAGE, TokenType.OUTPUT, 10_000_000, Decimal("0.0200"), Decimal("0.20")),
    ]
    assert inv.subtotal == Decimal("0.65")
    # live rows keep the digest they always had; a batch row is told apart
    assert usage_digest([live]) != usage_digest([batch])
    assert usage_digest([live]) == usage_digest([UsageQuantity(S, TokenType.OUTPUT, 10_000_000)])
