"""Receipts against issued invoices (billing_receipts): SQL only. Rows are appended, never changed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from billing.tables import receipts
from metering.clock import to_naive


@dataclass(frozen=True, slots=True)
class Receipt:
    document_id: int
    kind: str  # payment | write_off
    amount: Decimal
    withheld: Decimal
    received_on: date
    reference: str
    certificate: str | None


def of(conn: Connection, document_ids: list[int] | None = None) -> list[Receipt]:
    q = select(receipts).order_by(receipts.c.id)
    if document_ids is not None:
        q = q.where(receipts.c.document_id.in_(document_ids))
    return [
        Receipt(
            r["document_id"],
            r["kind"],
            Decimal(r["amount"]),
            Decimal(r["withheld"]),
            r["received_on"],
            r["reference"],
            r["certificate"],
        )
        for r in conn.execute(q).mappings()
    ]


def add(conn: Connection, receipt: Receipt, now: datetime) -> None:
    conn.execute(
        insert(receipts).values(
            document_id=receipt.document_id,
            kind=receipt.kind,
            amount=format(receipt.amount, "f"),
            withheld=format(receipt.withheld, "f"),
            received_on=receipt.received_on,
            reference=receipt.reference,
            certificate=receipt.certificate,
            recorded_at=to_naive(now),
        )
    )
