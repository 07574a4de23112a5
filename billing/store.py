"""billing's database access: a unit of work for writes, and one-call reads.

The SQL lives in the persistence modules, one concept each::

    billing/tables.py          the tables (``metadata``)
    billing/document_store.py  invoices, credit notes and the ledger events they bill
    billing/numbering.py       gapless number series
    billing/period_store.py    month runs and closes
    billing/fx_store.py        imported FX rates

They only persist, on the connection they are given. The service composes a write (check the
lifecycle, take a number, build the document, store it) inside ``with store.unit() as tx:``, and
the unit of work commits when the block ends (or rolls everything back on an exception): services
never commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy.engine import Connection, Engine

from billing import document_files, document_store, fx_store, numbering, period_store
from billing.document_store import Draft, NotFound, StaleDraft, StoredDocument, parse_ref
from billing.fx import FxRate
from billing.ledger_read import SeqRange
from billing.lifecycle import ISSUED, PENDING
from billing.tables import metadata

__all__ = [
    "ISSUED",
    "PENDING",
    "BillingStore",
    "Draft",
    "NotFound",
    "StaleDraft",
    "StoredDocument",
    "metadata",
    "parse_ref",
]


class BillingStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def unit(self) -> Iterator[Connection]:
        """A write unit of work: one transaction, committed when the block ends without an exception."""
        with self._engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    # --- one-call reads ----------------------------------------------------------------------
    def get(self, ref: str) -> StoredDocument:
        """A document by number or draft reference; raises NotFound."""
        with self.read() as conn:
            return document_store.get(conn, ref)

    def find(
        self,
        *,
        tenant_id: str | None = None,
        period: str | None = None,
        statuses: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
    ) -> list[StoredDocument]:
        with self.read() as conn:
            return document_store.find(
                conn, tenant_id=tenant_id, period=period, statuses=statuses, kinds=kinds
            )

    def billed_through(self, tenant_ids: Iterable[str] | None = None) -> dict[tuple[str, str], int]:
        with self.read() as conn:
            return document_store.billed_through(conn, tenant_ids)

    def archived(self, document_id: int, fmt: str, status: str) -> bytes | None:
        with self.read() as conn:
            return document_files.get(conn, document_id, fmt, status)

    def archive(self, document_id: int, fmt: str, status: str, content: bytes, now: datetime) -> bytes:
        """Keep a rendering; the first one stored wins (returned), so every reader gets the same bytes."""
        with self.unit() as tx:
            return document_files.put(tx, document_id, fmt, status, content, now)

    def ranges(self, document_id: int) -> list[SeqRange]:
        with self.read() as conn:
            return document_store.ranges(conn, document_id)

    def invoice_states(self, periods: Iterable[str]) -> dict[tuple[str, str], set[str]]:
        with self.read() as conn:
            return document_store.invoice_states(conn, periods)

    def invoiced_periods(self) -> set[str]:
        with self.read() as conn:
            return document_store.invoiced_periods(conn)

    def counter(self, series: str) -> int:
        with self.read() as conn:
            return numbering.last_number(conn, series)

    def was_run(self, period: str) -> bool:
        with self.read() as conn:
            return period_store.was_run(conn, period)

    def closed_periods(self) -> dict[str, int]:
        with self.read() as conn:
            return period_store.closed_periods(conn)

    def fx_corrections(self) -> list[tuple[FxRate, str, str]]:
        with self.read() as conn:
            return fx_store.corrections(conn)

    def fx_rates(self) -> list[FxRate]:
        with self.read() as conn:
            return fx_store.all_rates(conn)
