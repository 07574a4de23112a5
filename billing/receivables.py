"""Receivables: what is owed on each issued invoice, payments against it, aging (issue 13).

Per invoice: due = total - its credit notes - the prepaid credit applied to it; settled = payments
received + tax the buyer withheld (with its certificate) + written off; outstanding = due - settled.
Status, derived (never stored):

    written_off      a write-off was recorded
    paid             nothing outstanding
    partially_paid   something received, something outstanding
    overdue          nothing received and past the due date
    open             nothing received, not yet due

Withholding tax (configs/billing/withholding.yaml, per buyer country: SA, UZ, PK, IN): the buyer pays
the invoice net of the tax it withholds and sends a certificate; `invoices pay NUMBER --amount NET
--wht-amount TAX --wht-certificate ID` settles it. Withheld tax at most the country's rate of the
amount due (a cent of rounding allowed), and only where the buyer's country withholds.

`pay` and `write_off` lock the invoice (billing/issuing.py `lock_document`) and refuse to settle more than is
outstanding, so two payments at once cannot overpay it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from billing import document_store, receipts_store
from billing.config_io import decimal_text, read_yaml, validate
from billing.document_store import StoredDocument
from billing.errors import DocumentStateError, InvalidUsage
from billing.issuing import lock_document
from billing.money import minor_units, round_money, to_decimal, whole_minor_units
from billing.receipts_store import Receipt
from billing.store import BillingStore

BUCKETS = ("current", "1-30", "31-60", "61-90", "90+")


class _Wht(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: Decimal
    source: str

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Decimal:
        rate = to_decimal(decimal_text(value))
        if not 0 < rate < 100:
            raise ValueError("a withholding rate is a percentage between 0 and 100")
        return rate


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    withholding: dict[str, _Wht]


def load_withholding(path: Path) -> Mapping[str, _Wht]:
    """Country -> withholding rate and source; {} when the file is absent."""
    if not path.exists():
        return {}
    return validate(_File, read_yaml(path), str(path)).withholding


@dataclass(frozen=True, slots=True)
class Receivable:
    number: str
    tenant_id: str
    currency: str
    issue_date: date
    due_date: date
    total: Decimal
    credited: Decimal
    received: Decimal
    withheld: Decimal
    written_off: Decimal
    status: str
    wht_rate: Decimal | None  # the buyer's country withholds this much (configs/billing/withholding.yaml)
    prepaid: Decimal = Decimal(0)  # prepaid credit applied when it was issued (billing/credits.py)

    @property
    def due(self) -> Decimal:
        return self.total - self.credited - self.prepaid

    @property
    def outstanding(self) -> Decimal:
        return self.due - self.received - self.withheld - self.written_off

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "tenant": self.tenant_id,
            "currency": self.currency,
            "issue_date": self.issue_date.isoformat(),
            "due_date": self.due_date.isoformat(),
            "total": str(self.total),
            "credited": str(self.credited),
            "prepaid_applied": str(self.prepaid),
            "received": str(self.received),
            "withheld": str(self.withheld),
            "written_off": str(self.written_off),
            "outstanding": str(self.outstanding),
            "status": self.status,
            "withholding_rate": None if self.wht_rate is None else str(self.wht_rate),
        }


def receivable(
    row: StoredDocument, credited: Decimal, rows: Sequence[Receipt], today: date, wht: Mapping[str, _Wht]
) -> Receivable:
    doc = row.document or {}
    total = row.total or Decimal(0)
    received = sum((r.amount for r in rows if r.kind == "payment"), Decimal(0))
    withheld = sum((r.withheld for r in rows if r.kind == "payment"), Decimal(0))
    written = sum((r.amount for r in rows if r.kind == "write_off"), Decimal(0))
    prepaid = sum((Decimal(p["amount"]) for p in doc.get("prepaid_applied", ())), Decimal(0))
    due_date = date.fromisoformat(str(doc.get("due_date") or doc.get("issue_date")))
    outstanding = total - credited - prepaid - received - withheld - written
    if written:
        status = "written_off"
    elif outstanding <= 0:
        status = "paid"
    elif received or withheld:
        status = "partially_paid"
    else:
        status = "overdue" if today > due_date else "open"
    country = str((doc.get("buyer") or {}).get("billing_country", ""))
    rate = wht[country].rate if country in wht else None
    assert row.number is not None and row.issue_date is not None
    return Receivable(
        row.number, row.tenant_id, row.currency or "", row.issue_date, due_date, total, credited,
        received, withheld, written, status, rate, prepaid,
    )  # fmt: skip


def bucket(days_late: int) -> str:
    if days_late <= 0:
        return "current"
    if days_late <= 30:
        return "1-30"
    if days_late <= 60:
        return "31-60"
    return "61-90" if days_late <= 90 else "90+"


def aging(items: Iterable[Receivable], as_of: date) -> list[dict[str, Any]]:
    """Outstanding amounts per (tenant, currency) in days-past-due buckets."""
    out: dict[tuple[str, str], dict[str, Decimal]] = {}
    for r in items:
        if r.status in ("paid", "written_off") or r.outstanding <= 0:
            continue
        row = out.setdefault((r.tenant_id, r.currency), dict.fromkeys(BUCKETS, Decimal(0)))
        row[bucket((as_of - r.due_date).days)] += r.outstanding
    return [
        {
            "tenant": t,
            "currency": c,
            **{b: str(v) for b, v in amounts.items()},
            "total": str(sum(amounts.values())),
        }
        for (t, c), amounts in sorted(out.items())
    ]


def record(
    store: BillingStore,
    row: StoredDocument,
    receipt: Receipt,
    *,
    today: date,
    wht: Mapping[str, _Wht],
    now: datetime,
) -> Receivable:
    """Append a payment or a write-off under the invoice's lock; refuses to settle more than is owed."""
    if receipt.amount < 0 or receipt.withheld < 0 or (receipt.amount == 0 and receipt.withheld == 0):
        raise InvalidUsage("a payment needs a positive amount (and a withheld tax of 0 or more)")
    if receipt.withheld and not receipt.certificate:
        raise InvalidUsage("withheld tax needs the buyer's withholding certificate (--wht-certificate)")
    with store.unit() as tx:
        locked = lock_document(tx, row.id)
        if locked.kind != "invoice" or locked.status != "finalized":
            raise DocumentStateError(f"{row.ref} is {locked.status}: only a finalized invoice takes payments")
        before = receivable(
            locked, document_store.credited(tx, row.id), receipts_store.of(tx, [row.id]), today, wht
        )
        if before.status == "written_off":
            raise DocumentStateError(f"{row.ref} was written off")
        for what, value in (("amount", receipt.amount), ("withheld tax", receipt.withheld)):
            if not whole_minor_units(value, before.currency):
                raise InvalidUsage(
                    f"the {what} {value} has more decimals than {before.currency} has"
                    f" ({minor_units(before.currency)})"
                )
        if receipt.withheld:
            if before.wht_rate is None:
                raise InvalidUsage(
                    f"the buyer's country does not withhold tax on {row.ref} (withholding.yaml)"
                )
            most = round_money(before.due * before.wht_rate / 100, before.currency) + Decimal("0.01")
            if before.withheld + receipt.withheld > most:
                raise InvalidUsage(
                    f"withheld {before.withheld + receipt.withheld} exceeds "
                    f"{before.wht_rate} % of {before.due}"
                )
        if receipt.amount + receipt.withheld > before.outstanding:
            raise DocumentStateError(
                f"{row.ref}: {receipt.amount + receipt.withheld} is more than the {before.outstanding} "
                f"{before.currency} outstanding"
            )
        receipts_store.add(tx, receipt, now)
        after = receipts_store.of(tx, [row.id])
        return receivable(locked, before.credited, after, today, wht)
