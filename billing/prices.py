"""The one price source: the price book read from one path, shared by invoices, budgets and the spend metric.

The application builds it once (``load_price_source(settings.price_book_path)``) and hands the same
object to billing (billing/service.py), the budget pricer (serving/limits/pricing.py) and the spend
metric (serving/spend.py), so a budget hold, a spend estimate and an invoice always price from the
same version of the same file.

Loading never raises: an unreadable or invalid file is kept as the error, and ``book()`` raises it
(a ``BillingError`` naming the file and field) to whoever asks for a price: money budgets then
refuse (fail closed), the spend metric stays silent, a billing run reports the error.

``refresh()`` re-reads the file when it changed on disk (size or modification time); a billing run
calls it first, so a corrected price book takes effect at the next month-close run without a
restart, and the budget pricer and the spend metric see the new version from then on (they compare
``book()`` by identity to drop what they cached).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from billing import price_book
from billing.errors import BillingError
from billing.tariffs import Converter, load_premium_table
from metering.language_premiums import PremiumTable

PREMIUMS_FILE = "language_premiums.csv"
MAX_CONVERTERS = 10_000  # tenants' converters kept per book; forgotten all at once when full


@dataclass(frozen=True, slots=True)
class _Loaded:
    stamp: tuple[int, int] | None  # (size, mtime_ns) of the file read; None: missing, or a fixed book
    book: price_book.PriceBook | None
    error: BillingError | None
    premiums: PremiumTable | None = None  # language_premiums.csv beside the price book (tariffs)
    # (tenant, currency) -> its Converter over this book: shared by budgets, the spend metric and
    # billing runs, dropped with the book when the file is re-read
    converters: dict[tuple[str, str], Converter] = field(default_factory=dict)


class PriceSource:
    """The price book of one file, or the reason it is unusable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._loaded = self._load()

    @classmethod
    def of(
        cls,
        book: price_book.PriceBook,
        *,
        path: Path = Path("<memory>"),
        premiums: PremiumTable | None = None,
    ) -> PriceSource:
        """A fixed source over an already parsed book (tests, tools)."""
        source = cls.__new__(cls)
        source.path = path
        source._lock = threading.Lock()
        source._loaded = _Loaded(None, book, None, premiums)
        return source

    @property
    def premiums_path(self) -> Path:
        """The language premiums an english_equivalent tariff divides by: beside the price book."""
        return self.path.parent / PREMIUMS_FILE

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st, extra = os.stat(self.path), self.premiums_path
            more = os.stat(extra) if extra.exists() else None
        except OSError:
            return None
        return st.st_size + (more.st_size if more else 0), st.st_mtime_ns + (more.st_mtime_ns if more else 0)

    def _load(self) -> _Loaded:
        stamp = self._stamp()
        try:
            return _Loaded(stamp, price_book.load(self.path), None, load_premium_table(self.premiums_path))
        except BillingError as exc:
            return _Loaded(stamp, None, exc)

    def refresh(self) -> None:
        """Re-read the file if it changed since it was read (no-op for a fixed source)."""
        if self._loaded.stamp is None and self._loaded.book is not None:  # a fixed book
            return
        with self._lock:
            if self._stamp() != self._loaded.stamp:
                self._loaded = self._load()

    @property
    def available(self) -> bool:
        return self._loaded.book is not None

    @property
    def error(self) -> BillingError | None:
        return self._loaded.error

    def premiums(self) -> PremiumTable | None:
        """The language premiums read with the book (None: no file)."""
        return self._loaded.premiums

    def converter(self, tenant_id: str, currency: str) -> Converter:
        """The tenant's events as billed under its tariff (billing/tariffs.py), one per tenant and
        book (its per-day tariff cache kept); raises like book()."""
        loaded = self._loaded
        book = self.book()
        key = (tenant_id, currency)
        found = loaded.converters.get(key)
        if found is None:
            if len(loaded.converters) >= MAX_CONVERTERS:
                loaded.converters.clear()
            found = loaded.converters[key] = Converter(book, loaded.premiums, tenant_id, currency)
        return found

    def book(self) -> price_book.PriceBook:
        """The current price book; raises the load error when the file is unusable."""
        loaded = self._loaded
        if loaded.book is None:
            assert loaded.error is not None
            raise loaded.error
        return loaded.book


def load_price_source(path: Path) -> PriceSource:
    """The price source of one file (read now; errors kept, see the module docstring)."""
    return PriceSource(Path(path))
