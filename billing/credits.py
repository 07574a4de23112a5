"""Prepaid credit (issue 13): a tenant's balance, granted by top-ups and used by its invoices.

- A **paid** top-up is money received before the usage: it gets a receipt numbered in its own gapless
  series (``TP-RCP-2027-000001``, billing/numbering.py), in the tenant's currency. It is a receipt, not
  a prepayment invoice: the shipped tax rules tax the supply when it is invoiced (the month's invoice
  carries the tax), which is where a cross-border B2B service is taxed; a jurisdiction that taxes
  advance payments would need a prepayment invoice instead (README: Limits).
- A **promotional** grant is credit given away (a campaign, a goodwill gesture), with an optional
  expiry, and no receipt: it is kept apart from paid credit in every balance and on the invoice.

Finalizing an invoice applies the balance under the tenant's numbering lock (billing/issuing.py):
promotional credit first (it may expire), then paid, at most the invoice's total; the invoice states
both and its amount due (total - credit applied; UBL PrepaidAmount / PayableAmount). Rows are
append-only: a grant is a positive row, a use a negative one naming the invoice; the balance is
their sum.

A tenant with a prepaid money budget (`tenants set-limits --budget-period prepaid --budget-unit money`)
has the grant added to that budget in the same transaction, so the budget guard stops usage at the
balance the invoices will draw on (billing/service.py `add_credit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from billing import numbering
from billing.document_store import NotFound
from billing.errors import InvalidUsage
from billing.money import minor_units, round_money, whole_minor_units
from billing.parties import NumberSeries
from billing.tables import credits

KINDS = ("promotional", "paid")  # the order they are applied in


@dataclass(frozen=True, slots=True)
class Grant:
    tenant_id: str
    currency: str
    kind: str
    amount: Decimal
    number: str | None
    reference: str
    expires_on: date | None
    recorded_at: datetime

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "object": "credit_grant",
            "tenant": self.tenant_id,
            "currency": self.currency,
            "kind": self.kind,
            "amount": str(self.amount),
            "receipt_number": self.number,
            "reference": self.reference,
            "expires_on": self.expires_on.isoformat() if self.expires_on else None,
            "recorded_at": self.recorded_at.isoformat(),
        }


def check_grant(kind: str, amount: Decimal, currency: str, reference: str, expires_on: date | None) -> None:
    if kind not in KINDS:
        raise InvalidUsage(f"credit kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if amount <= 0:
        raise InvalidUsage("a credit needs a positive amount")
    if not whole_minor_units(amount, currency):
        raise InvalidUsage(
            f"the amount {amount} has more decimals than {currency} has ({minor_units(currency)})"
        )
    if not reference.strip():
        raise InvalidUsage("a credit needs a reference (the bank transfer, or the campaign)")
    if expires_on is not None and kind == "paid":
        raise InvalidUsage(
            "paid credit does not expire (it was paid for): only promotional credit has an expiry"
        )


def grant(
    tx: Connection,
    *,
    tenant_id: str,
    currency: str,
    kind: str,
    amount: Decimal,
    reference: str,
    expires_on: date | None,
    series: NumberSeries,
    now: datetime,
) -> Grant:
    """Record a grant in the caller's unit of work; a paid one takes the next receipt number."""
    check_grant(kind, amount, currency, reference, expires_on)
    numbering.lock_tenant(tx, tenant_id)
    number = None
    if kind == "paid":
        name = f"{series.receipts}{now.year}"
        number = series.format("receipt", now.year, numbering.next_number(tx, name))
    row = Grant(tenant_id, currency, kind, amount, number, reference.strip(), expires_on, now)
    _record(tx, tenant_id, currency, kind, amount, row.reference, now, number=number, expires_on=expires_on)
    return row


def _record(
    tx: Connection,
    tenant_id: str,
    currency: str,
    kind: str,
    amount: Decimal,
    reference: str,
    now: datetime,
    **extra: Any,
) -> None:
    """One row of the credit ledger (+ a grant, - a use on an invoice)."""
    tx.execute(
        credits.insert().values(
            tenant_id=tenant_id,
            currency=currency,
            kind=kind,
            amount=str(amount),
            reference=reference,
            recorded_at=now.replace(tzinfo=None),
            **extra,
        )
    )


def balance(conn: Connection, tenant_id: str, currency: str, on: date) -> dict[str, Decimal]:
    """What is left per kind on ``on``. Paid credit is the sum of its rows. Promotional uses are replayed
    in order, each drawing on the grants valid that day that expire soonest; what is left of grants
    expired by ``on`` is gone."""
    rows = conn.execute(
        select(credits.c.kind, credits.c.amount, credits.c.expires_on, credits.c.recorded_at)
        .where(credits.c.tenant_id == tenant_id, credits.c.currency == currency)
        .order_by(credits.c.id)
    ).all()
    paid = sum((Decimal(a) for k, a, _e, _r in rows if k == "paid"), Decimal(0))
    open_grants: list[list[Any]] = []  # [expires_on or date.max, left]
    for kind, amount, expires_on, recorded_at in rows:
        if kind != "promotional":
            continue
        value = Decimal(amount)
        if value > 0:
            open_grants.append([expires_on or date.max, value])
            continue
        need, day = -value, recorded_at.date()
        for g in sorted((g for g in open_grants if g[0] >= day and g[1] > 0), key=lambda g: g[0]):
            take = min(g[1], need)
            g[1] -= take
            need -= take
    promotional = sum((g[1] for g in open_grants if g[0] >= on), Decimal(0))
    return {"promotional": promotional, "paid": paid}


def apply(
    tx: Connection,
    *,
    tenant_id: str,
    currency: str,
    document_id: int,
    number: str,
    total: Decimal,
    on: date,
    now: datetime,
) -> dict[str, Decimal]:
    """Use the balance on an invoice of ``total`` (under the tenant's lock): per kind, what was applied."""
    left = balance(tx, tenant_id, currency, on)
    applied: dict[str, Decimal] = {}
    rest = total
    for kind in KINDS:
        use = round_money(min(left[kind], rest), currency)
        if use > 0:
            applied[kind] = use
            rest -= use
            _record(tx, tenant_id, currency, kind, -use, number, now, document_id=document_id)
    return applied


def restore(tx: Connection, *, invoice_id: int, reference: str, now: datetime) -> dict[str, Decimal]:
    """A voided invoice gives back the credit it used (its credit note named in ``reference``);
    restored promotional credit expires with the tenant's latest promotional grant."""
    used = tx.execute(
        select(credits.c.tenant_id, credits.c.currency, credits.c.kind, credits.c.amount).where(
            credits.c.document_id == invoice_id
        )
    ).all()
    back: dict[str, Decimal] = {}
    for tenant_id, currency, kind, amount in used:
        value = -Decimal(amount)
        expiry = None
        if kind == "promotional":
            expiries = (
                tx.execute(
                    select(credits.c.expires_on).where(
                        credits.c.tenant_id == tenant_id,
                        credits.c.kind == "promotional",
                        credits.c.amount.not_like("-%"),
                    )
                )
                .scalars()
                .all()
            )
            expiry = None if None in expiries else max(expiries, default=None)
        _record(tx, tenant_id, currency, kind, value, reference, now, expires_on=expiry)
        back[kind] = back.get(kind, Decimal(0)) + value
    return back


def receipt(conn: Connection, number: str) -> dict[str, Any]:
    """A paid grant by its receipt number (NotFound otherwise), as `Grant.to_json_dict`."""
    row = conn.execute(select(credits).where(credits.c.number == number)).mappings().first()
    if row is None:
        raise NotFound(f"no receipt {number!r}")
    return Grant(
        row["tenant_id"],
        row["currency"],
        row["kind"],
        Decimal(row["amount"]),
        row["number"],
        row["reference"],
        row["expires_on"],
        row["recorded_at"],
    ).to_json_dict()


def grants(conn: Connection, tenant_id: str) -> list[Mapping[str, Any]]:
    """Every row of the tenant's credit ledger, oldest first (grants and uses)."""
    rows = conn.execute(select(credits).where(credits.c.tenant_id == tenant_id).order_by(credits.c.id))
    return [dict(r) for r in rows.mappings()]
