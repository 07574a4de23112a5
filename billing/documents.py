"""Invoice, InvoiceLine, AppliedTax, FxUse, CreditNote: frozen documents and their stable JSON.

``to_json_dict()`` is a contract (stored documents, API, CLI): names never change, fields may be
added. Amounts, rates and prices are decimal strings, never floats; dates are ISO 8601 strings.
``from_json_dict`` reloads a stored document exactly (``from_json_dict(d.to_json_dict()) == d``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from billing.money import fmt, round_money
from metering.events import TokenType

SCHEMA_VERSION = 1


class DocumentStatus(enum.StrEnum):
    DRAFT = "draft"
    FINALIZED = "finalized"
    VOID = "void"


class LineKind(enum.StrEnum):
    USAGE = "usage"
    ADJUSTMENT = "adjustment"  # late usage of an earlier period (may be negative)
    MINIMUM_COMMITMENT = "minimum_commitment"  # top-up to the contract's monthly minimum
    BATCH_USAGE = "batch_usage"  # Batch API usage, at the price book's batch discount


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceLine:
    kind: LineKind
    model: str | None
    token_type: TokenType | None
    quantity_tokens: int
    unit_price_per_million: Decimal | None
    amount: Decimal  # rounded once (money.round_money)
    amount_unrounded: Decimal  # quantity x price / 1e6, exact
    tier: int | None = None  # 1-based tier index for tiered prices
    tier_mode: str | None = None  # flat | graduated | volume
    period: str | None = (
        None  # YYYY-MM of a late supply (its own prices, tiers and tax); None: this invoice's
    )
    price_book_version: str | None = None  # set when the price changed inside the period (lines per version)
    # A tariff other than tokens (billing/tariffs.py): quantity_tokens holds the billed units, in `unit`
    # (english_equivalent_token | character | token), of `language`, from `raw_tokens` with `factor`
    # (the language premium divided by; None: none applied). All None on a tokens tariff.
    unit: str | None = None
    language: str | None = None
    raw_tokens: int | None = None
    factor: Decimal | None = None
    factor_source: str | None = None  # the premium row: "<measured_on> <tokenizer>: <source>"

    @property
    def adjustment(self) -> bool:
        return self.kind is LineKind.ADJUSTMENT

    def to_json_dict(self) -> dict[str, Any]:
        return (
            {
                "kind": self.kind.value,
                "model": self.model,
                "token_type": self.token_type.value if self.token_type else None,
                "quantity_tokens": self.quantity_tokens,
                "unit_price_per_million": _s(self.unit_price_per_million),
                "amount": fmt(self.amount),
                "amount_unrounded": fmt(self.amount_unrounded),
                "adjustment": self.adjustment,
                "tier": self.tier,
                "tier_mode": self.tier_mode,
            }
            | ({"period": self.period} if self.period else {})
            | ({"price_book_version": self.price_book_version} if self.price_book_version else {})
            | (
                {
                    "unit": self.unit,
                    "language": self.language,
                    "raw_tokens": self.raw_tokens,
                    "factor": _s(self.factor),
                    "factor_source": self.factor_source,
                    "billed_units": self.quantity_tokens,
                }
                if self.unit
                else {}
            )
        )

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> InvoiceLine:
        return cls(
            kind=LineKind(d["kind"]),
            model=d["model"],
            token_type=TokenType(d["token_type"]) if d["token_type"] else None,
            quantity_tokens=int(d["quantity_tokens"]),
            unit_price_per_million=_d(d["unit_price_per_million"]),
            amount=Decimal(d["amount"]),
            amount_unrounded=Decimal(d["amount_unrounded"]),
            tier=d.get("tier"),
            tier_mode=d.get("tier_mode"),
            period=d.get("period"),
            price_book_version=d.get("price_book_version"),
            unit=d.get("unit"),
            language=d.get("language"),
            raw_tokens=d.get("raw_tokens"),
            factor=_d(d.get("factor")),
            factor_source=d.get("factor_source"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AppliedTax:
    treatment: str  # billing.tax.Treatment value
    rate: Decimal  # the rate charged on this document (0 unless supplier_charges)
    statutory_rate: Decimal | None  # the jurisdiction's rate (what a reverse-charging buyer applies)
    taxable_amount: Decimal
    amount: Decimal  # rounded once
    amount_unrounded: Decimal  # taxable amount x rate / 100, exact
    currency: str
    note: str  # English wording
    wording: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # language -> text
    tax_currency: str | None = None  # e.g. SAR: the tax also stated in the local currency
    tax_currency_taxable_amount: Decimal | None = None
    tax_currency_amount: Decimal | None = None
    periods: tuple[str, ...] = ()  # late supplies (YYYY-MM) taxed here; () : only this invoice's period

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "treatment": self.treatment,
            "rate": fmt(self.rate),
            "statutory_rate": _s(self.statutory_rate),
            "taxable_amount": fmt(self.taxable_amount),
            "amount": fmt(self.amount),
            "amount_unrounded": fmt(self.amount_unrounded),
            "currency": self.currency,
            "note": self.note,
            "wording": dict(self.wording),
            "tax_currency": self.tax_currency,
            "tax_currency_taxable_amount": _s(self.tax_currency_taxable_amount),
            "tax_currency_amount": _s(self.tax_currency_amount),
        } | ({"periods": list(self.periods)} if self.periods else {})

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> AppliedTax:
        return cls(
            treatment=d["treatment"],
            rate=Decimal(d["rate"]),
            statutory_rate=_d(d["statutory_rate"]),
            taxable_amount=Decimal(d["taxable_amount"]),
            amount=Decimal(d["amount"]),
            amount_unrounded=Decimal(d["amount_unrounded"]),
            currency=d["currency"],
            note=d["note"],
            wording=MappingProxyType(dict(d.get("wording", {}))),
            tax_currency=d.get("tax_currency"),
            tax_currency_taxable_amount=_d(d.get("tax_currency_taxable_amount")),
            tax_currency_amount=_d(d.get("tax_currency_amount")),
            periods=tuple(d.get("periods", ())),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FxUse:
    """An FX rate a document used: 1 ``from_currency`` = ``rate`` ``to_currency``."""

    from_currency: str
    to_currency: str
    rate: Decimal
    source: str
    date: date
    purpose: str  # tax_currency | ledger

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "from": self.from_currency,
            "to": self.to_currency,
            "rate": fmt(self.rate),
            "source": self.source,
            "date": self.date.isoformat(),
            "purpose": self.purpose,
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> FxUse:
        return cls(
            from_currency=d["from"],
            to_currency=d["to"],
            rate=Decimal(d["rate"]),
            source=d["source"],
            date=date.fromisoformat(d["date"]),
            purpose=d["purpose"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SellerSnapshot:
    id: str
    name: str
    local_name: str
    address_lines: tuple[str, ...]
    city: str
    postal_code: str
    country: str
    tax_id: str  # home registration (CN: USCC), EN 16931 BT-30/BT-32
    vat_id: str | None  # registration in the buyer's jurisdiction, ISO-prefixed (BT-31)
    email: str
    bank: Mapping[str, str]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "local_name": self.local_name,
            "address_lines": list(self.address_lines),
            "city": self.city,
            "postal_code": self.postal_code,
            "country": self.country,
            "tax_id": self.tax_id,
            "vat_id": self.vat_id,
            "email": self.email,
            "bank": dict(self.bank),
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> SellerSnapshot:
        return cls(
            **{**d, "address_lines": tuple(d["address_lines"]), "bank": MappingProxyType(dict(d["bank"]))}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BuyerSnapshot:
    id: str
    name: str
    billing_country: str
    tax_id: str | None  # normalized, without ISO prefix
    business: bool
    language: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "billing_country": self.billing_country,
            "tax_id": self.tax_id,
            "business": self.business,
            "language": self.language,
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> BuyerSnapshot:
        return cls(**d)


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerView:
    """The seller's own books (CN): treatment and the net amount in the ledger currency."""

    treatment: str
    rule_id: str
    currency: str
    net_amount: Decimal
    note: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "treatment": self.treatment,
            "rule_id": self.rule_id,
            "currency": self.currency,
            "net_amount": fmt(self.net_amount),
            "note": self.note,
        }

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> LedgerView:
        return cls(**{**d, "net_amount": Decimal(d["net_amount"])})


@dataclass(frozen=True, slots=True, kw_only=True)
class Withholding:
    """Tax the buyer withholds from its payment (configs/billing/withholding.yaml): the invoice says so,
    and a payment of ``net`` with the buyer's certificate for ``amount`` settles it."""

    country: str
    rate: Decimal
    amount: Decimal  # of the amount due, rounded
    net: Decimal  # what the buyer transfers
    source: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "country": self.country,
            "rate": fmt(self.rate),
            "amount": fmt(self.amount),
            "net_payable": fmt(self.net),
            "source": self.source,
        }

    @classmethod
    def of(cls, country: str, rate: Decimal, source: str, due: Decimal, currency: str) -> Withholding:
        amount = round_money(due * rate / 100, currency)
        return cls(country=country, rate=rate, amount=amount, net=due - amount, source=source)

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> Withholding:
        return cls(
            country=d["country"],
            rate=Decimal(d["rate"]),
            amount=Decimal(d["amount"]),
            net=Decimal(d["net_payable"]),
            source=d["source"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Invoice:
    number: str | None
    status: DocumentStatus
    issue_date: date
    due_date: date
    tax_point: date
    period_start: date
    period_end: date
    currency: str
    seller: SellerSnapshot
    buyer: BuyerSnapshot
    lines: tuple[InvoiceLine, ...]
    subtotal: Decimal
    taxes: tuple[AppliedTax, ...]
    total: Decimal
    fx: tuple[FxUse, ...]
    usage_digest: str
    price_book_version: str
    contract_id: str | None
    tax_rule_id: str
    ledger: LedgerView
    kind: str = "invoice"
    # the tenant's ledger events this invoice bills, as runs of `tenant_seq` (inclusive): what a tenant
    # selects from /v1/usage/events to recompute `usage_digest` (README: Billing -> Trust)
    billed_events: tuple[tuple[int, int], ...] = ()
    # prepaid credit applied at finalization (billing/credits.py): (kind, amount), promotional first
    prepaid: tuple[tuple[str, Decimal], ...] = ()
    withholding: Withholding | None = None

    @property
    def tax_total(self) -> Decimal:
        return sum((t.amount for t in self.taxes), Decimal(0))

    @property
    def prepaid_total(self) -> Decimal:
        return sum((a for _k, a in self.prepaid), Decimal(0))

    @property
    def amount_due(self) -> Decimal:
        """The total less the prepaid credit applied (EN 16931 BT-115)."""
        return self.total - self.prepaid_total

    def to_json_dict(self) -> dict[str, Any]:
        out = _common_json(self)
        out["due_date"] = self.due_date.isoformat()
        if self.prepaid:
            out["prepaid_applied"] = [{"kind": k, "amount": fmt(a)} for k, a in self.prepaid]
            out["amount_due"] = fmt(self.amount_due)
        if self.withholding is not None:
            out["withholding"] = self.withholding.to_json_dict()
        return out

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> Invoice:
        wht = d.get("withholding")
        return cls(
            **_common(d),
            due_date=date.fromisoformat(d["due_date"]),
            prepaid=tuple((p["kind"], Decimal(p["amount"])) for p in d.get("prepaid_applied", ())),
            withholding=None if wht is None else Withholding.from_json_dict(wht),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditNote:
    """Reverses an invoice exactly: same lines, taxes and FX rates, amounts stated positive (UBL 381)."""

    number: str | None
    status: DocumentStatus
    issue_date: date
    tax_point: date
    period_start: date
    period_end: date
    currency: str
    seller: SellerSnapshot
    buyer: BuyerSnapshot
    lines: tuple[InvoiceLine, ...]
    subtotal: Decimal
    taxes: tuple[AppliedTax, ...]
    total: Decimal
    fx: tuple[FxUse, ...]
    usage_digest: str
    price_book_version: str
    contract_id: str | None
    tax_rule_id: str
    ledger: LedgerView
    reason: str
    original_number: str
    original_issue_date: date
    kind: str = "credit_note"
    billed_events: tuple[tuple[int, int], ...] = ()

    @property
    def tax_total(self) -> Decimal:
        return sum((t.amount for t in self.taxes), Decimal(0))

    def to_json_dict(self) -> dict[str, Any]:
        out = _common_json(self)
        out.update(
            reason=self.reason,
            original_number=self.original_number,
            original_issue_date=self.original_issue_date.isoformat(),
        )
        return out

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> CreditNote:
        return cls(
            **_common(d),
            reason=d["reason"],
            original_number=d["original_number"],
            original_issue_date=date.fromisoformat(d["original_issue_date"]),
        )


Document = Invoice | CreditNote


def tax_of(doc: Document, line: InvoiceLine) -> AppliedTax:
    """The tax entry that taxes a line: the one listing the line's supply period (a late supply's, or the
    document's own), or the only/first one when the document has a single supply."""
    supply = line.period or doc.period_start.strftime("%Y-%m")
    return next((t for t in doc.taxes if supply in t.periods), doc.taxes[0])


def document_from_json(d: Mapping[str, Any]) -> Document:
    return CreditNote.from_json_dict(d) if d.get("kind") == "credit_note" else Invoice.from_json_dict(d)


def _common_json(doc: Document) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": doc.kind,
        "number": doc.number,
        "status": doc.status.value,
        "issue_date": doc.issue_date.isoformat(),
        "tax_point": doc.tax_point.isoformat(),
        "period_start": doc.period_start.isoformat(),
        "period_end": doc.period_end.isoformat(),
        "currency": doc.currency,
        "seller": doc.seller.to_json_dict(),
        "buyer": doc.buyer.to_json_dict(),
        "lines": [line.to_json_dict() for line in doc.lines],
        "subtotal": fmt(doc.subtotal),
        "taxes": [t.to_json_dict() for t in doc.taxes],
        "tax_total": fmt(doc.tax_total),
        "total": fmt(doc.total),
        "fx": [f.to_json_dict() for f in doc.fx],
        "usage_digest": doc.usage_digest,
        "price_book_version": doc.price_book_version,
        "contract_id": doc.contract_id,
        "tax_rule_id": doc.tax_rule_id,
        "ledger": doc.ledger.to_json_dict(),
    } | (
        {
            "billed_events": {
                "tenant_seq_ranges": [list(r) for r in doc.billed_events],
                "count": sum(b - a + 1 for a, b in doc.billed_events),
            }
        }
        if doc.billed_events
        else {}
    )


def _common(d: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "number": d["number"],
        "status": DocumentStatus(d["status"]),
        "issue_date": date.fromisoformat(d["issue_date"]),
        "tax_point": date.fromisoformat(d["tax_point"]),
        "period_start": date.fromisoformat(d["period_start"]),
        "period_end": date.fromisoformat(d["period_end"]),
        "currency": d["currency"],
        "seller": SellerSnapshot.from_json_dict(d["seller"]),
        "buyer": BuyerSnapshot.from_json_dict(d["buyer"]),
        "lines": tuple(InvoiceLine.from_json_dict(x) for x in d["lines"]),
        "subtotal": Decimal(d["subtotal"]),
        "taxes": tuple(AppliedTax.from_json_dict(x) for x in d["taxes"]),
        "total": Decimal(d["total"]),
        "fx": tuple(FxUse.from_json_dict(x) for x in d["fx"]),
        "usage_digest": d["usage_digest"],
        "price_book_version": d["price_book_version"],
        "contract_id": d["contract_id"],
        "tax_rule_id": d["tax_rule_id"],
        "ledger": LedgerView.from_json_dict(d["ledger"]),
        "billed_events": tuple(
            (int(a), int(b)) for a, b in (d.get("billed_events") or {}).get("tenant_seq_ranges", [])
        ),
    }


def _s(value: Decimal | None) -> str | None:
    return None if value is None else fmt(value)


def _d(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def seq_runs(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Positions as inclusive runs: [1, 2, 3, 7, 9, 10] -> ((1, 3), (7, 7), (9, 10))."""
    runs: list[list[int]] = []
    for n in sorted(set(seqs)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return tuple((a, b) for a, b in runs)
