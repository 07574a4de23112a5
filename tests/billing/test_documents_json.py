import json
from collections.abc import Callable
from datetime import date
from typing import Any

from billing.documents import CreditNote, Invoice, document_from_json
from billing.engine import UsageQuantity, build_credit_note, finalize
from billing.parties import Buyer
from billing.render import render
from metering.events import TokenType

USAGE = [
    UsageQuantity("qwen2.5-7b-instruct", TokenType.INPUT, 150_000_000),
    UsageQuantity("smollm2-135m-instruct", TokenType.OUTPUT, 1_234_567),
]

CONTRACT_KEYS = {
    "number",
    "status",
    "issue_date",
    "period_start",
    "period_end",
    "currency",
    "seller",
    "buyer",
    "lines",
    "subtotal",
    "taxes",
    "total",
    "fx",
    "usage_digest",
    "price_book_version",
    "tax_rule_id",
}


def _walk(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _walk(v)]
    if isinstance(value, list):
        return [x for v in value for x in _walk(v)]
    return [value]


def test_json_schema_is_the_contract(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> None:
    inv = finalize(
        january(USAGE, make_buyer("SA", "300000000000003", tenant="t-sample-enterprise")),
        "TP-INV-2026-000001",
    )
    d = inv.to_json_dict()
    assert set(d) >= CONTRACT_KEYS
    assert {"id", "name", "billing_country", "tax_id", "business"} <= set(d["buyer"])
    for line in d["lines"]:
        assert {
            "model",
            "token_type",
            "quantity_tokens",
            "unit_price_per_million",
            "amount",
            "adjustment",
        } <= set(line)
    for tax in d["taxes"]:
        assert {"treatment", "rate", "taxable_amount", "amount", "currency", "note"} <= set(tax)
    for fx in d["fx"]:
        assert {"from", "to", "rate", "source", "date"} <= set(fx)
    assert not any(isinstance(v, float) for v in _walk(d))  # money is never a float
    # 42.00 (qwen input, graduated) + 0.05 (smollm2 output) = 42.05 < 500.00 minimum -> top-up 457.95
    assert d["status"] == "finalized" and d["subtotal"] == "500.00" and d["total"] == "500.00"
    assert d["lines"][-1]["amount"] == "457.95"
    assert d["lines"][-1]["kind"] == "minimum_commitment" and d["lines"][-1]["token_type"] is None
    assert d["taxes"][0]["tax_currency_taxable_amount"] == "1875.00"  # 500.00 x 3.75
    assert json.loads(render(inv, "json")) == d


def test_roundtrip_invoice_and_credit_note(
    january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]
) -> None:
    for who in (make_buyer("SA", "300000000000003"), make_buyer("RU", "7707083893"), make_buyer("PK")):
        inv = finalize(january(USAGE, who), "TP-INV-2026-000001")
        assert Invoice.from_json_dict(json.loads(json.dumps(inv.to_json_dict()))) == inv
        assert document_from_json(inv.to_json_dict()) == inv
        note = finalize(build_credit_note(inv, reason="r", issue_date=date(2026, 2, 3)), "TP-CRN-2026-000001")
        d = note.to_json_dict()
        assert (
            d["kind"] == "credit_note"
            and d["original_number"] == "TP-INV-2026-000001"
            and "due_date" not in d
        )
        assert CreditNote.from_json_dict(json.loads(json.dumps(d))) == note
        assert document_from_json(d) == note
    draft = january(USAGE, make_buyer("KZ", "940140000385"))
    assert Invoice.from_json_dict(draft.to_json_dict()) == draft and draft.to_json_dict()["number"] is None
