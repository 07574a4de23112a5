"""FX rate tables with source and date. A missing rate is an error, never "the latest rate".

CSV format (``configs/billing/fx_rates.csv``; ``tokenport fx import FILE`` uses ``import_csv``)::

    # comment lines start with '#'
    date,base,quote,rate,source
    2026-01-01,USD,CNY,7.0288,sample:PBOC-central-parity

meaning ``1 base = rate quote`` on ``date`` as published by ``source``.

Lookup ``FxTable.rate(from, to, on)`` uses, in this order: the direct rate; the inverse of the
opposite rate; a cross rate through the pivot currency (USD). A day without a publication (a weekend,
a holiday) uses the previous publication, at most ``max_age_days`` (default 7) before: the rate keeps
its own date, which the invoice shows; older than that is an error, never "the latest rate".

Guards (every row, on import and when the shipped file and the stored rates are combined): a rate is
positive and within ``MIN_RATE``..``MAX_RATE``; base and quote differ; a rate and the opposite rate of
the same day may not disagree by more than ``INVERSE_TOLERANCE`` (1 x inverse = 1 ± 1 %). An error
names the file, the line, the field and the reason.
Derived rates are computed exactly, rounded once to 10 decimal places (ROUND_HALF_UP), and their
source says how they were derived; the rate recorded on a document is exactly the rate used.

Which date applies is the tax rule's ``FxDateRule`` (``fx_date``): SA VAT uses the rate of the tax
point date; the Chinese ledger uses the PBoC central parity of the first day of the month (or of
the issue date, a per-entity choice kept for at least a year).
"""

from __future__ import annotations

import csv
import enum
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from billing.errors import FxImportError, FxRateMissing
from billing.money import CurrencyError, check_currency, div, mul, to_decimal

RATE_PLACES = Decimal("1E-10")
COLUMNS = ("date", "base", "quote", "rate", "source")
MIN_RATE, MAX_RATE = Decimal("1E-6"), Decimal("1E+6")  # 1 unit of any currency in any other, sanely
INVERSE_TOLERANCE = Decimal("0.01")
MAX_AGE_DAYS = 7  # a day without a publication uses the previous one, at most this many days before


def check_rate(base: str, quote: str, rate: Decimal) -> None:
    """A row's own sanity: raises ValueError naming what is wrong."""
    if base == quote:
        raise ValueError(f"base and quote are both {base}: a currency has no rate against itself")
    if not rate.is_finite() or rate <= 0:
        raise ValueError(f"rate {rate} must be a positive number")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"rate {rate} is outside {MIN_RATE:f}..{MAX_RATE:f}: a typo, not a rate")


class FxDateRule(enum.StrEnum):
    TAX_POINT = "tax_point"
    ISSUE_DATE = "issue_date"
    FIRST_OF_MONTH = "first_of_month"  # first day of the tax point's month


def fx_date(rule: FxDateRule, *, tax_point: date, issue_date: date) -> date:
    if rule is FxDateRule.TAX_POINT:
        return tax_point
    if rule is FxDateRule.ISSUE_DATE:
        return issue_date
    return tax_point.replace(day=1)


@dataclass(frozen=True, slots=True)
class FxRate:
    """1 ``base`` = ``rate`` ``quote`` on ``date``, as published by ``source``."""

    date: date
    base: str
    quote: str
    rate: Decimal
    source: str


@dataclass(frozen=True, slots=True)
class FxTable:
    rates: tuple[FxRate, ...] = ()
    pivot: str = "USD"
    max_age_days: int = MAX_AGE_DAYS
    _index: dict[tuple[date, str, str], FxRate] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for r in self.rates:
            key = (r.date, r.base, r.quote)
            seen = self._index.get(key)
            if seen is not None and seen.rate != r.rate:
                raise FxImportError(
                    f"two different {r.base}/{r.quote} rates for {r.date}: "
                    f"{seen.rate} ({seen.source}) and {r.rate} ({r.source})"
                )
            self._index[key] = r
        for (day, base, quote), r in self._index.items():
            other = self._index.get((day, quote, base))
            if other is not None and abs(r.rate * other.rate - 1) > INVERSE_TOLERANCE:
                raise FxImportError(
                    f"{base}/{quote} {r.rate} ({r.source}) and {quote}/{base} {other.rate} "
                    f"({other.source}) on {day} disagree: their product is {r.rate * other.rate:f}, "
                    f"not 1 (± {INVERSE_TOLERANCE:%})"
                )

    def with_rates(self, more: list[FxRate]) -> FxTable:
        return FxTable(self.rates + tuple(more), self.pivot, self.max_age_days)

    def _leg(self, base: str, quote: str, on: date) -> tuple[Decimal, str, date] | None:
        """The exact (unrounded) rate base->quote from a direct or opposite row of ``on``, else of the
        previous publication within ``max_age_days``; with the publication's date."""
        for back in range(self.max_age_days + 1):
            day = on - timedelta(days=back)
            hit = self._index.get((day, base, quote))
            if hit is not None:
                return hit.rate, hit.source, day
            inverse = self._index.get((day, quote, base))
            if inverse is not None:
                return div(Decimal(1), inverse.rate), f"inverse:{inverse.source}", day
        return None

    def rate(self, from_currency: str, to_currency: str, on: date) -> FxRate:
        """The rate to convert ``from_currency`` amounts into ``to_currency`` on ``on``."""
        base, quote = check_currency(from_currency), check_currency(to_currency)
        if base == quote:
            return FxRate(on, base, quote, Decimal(1), "identity")
        direct = self._index.get((on, base, quote))
        if direct is not None:
            return direct
        legs = [self._leg(base, quote, on)]
        if legs[0] is None and self.pivot not in (base, quote):
            legs = [self._leg(base, self.pivot, on), self._leg(self.pivot, quote, on)]
        found = [leg for leg in legs if leg is not None]
        if len(found) == len(legs):
            published = min(day for _, _, day in found)  # the rate's own date (a previous publication)
            earlier = self._index.get((published, base, quote)) if len(found) == 1 else None
            if earlier is not None:  # the direct rate of a previous publication, as stored
                return earlier
            exact = mul(*(rate for rate, _, _ in found))
            sources = [source for _, source, _ in found]
            source = sources[0] if len(sources) == 1 else f"cross:{self.pivot}({';'.join(sources)})"
            return FxRate(published, base, quote, exact.quantize(RATE_PLACES, ROUND_HALF_UP), source)
        raise FxRateMissing(
            f"no FX rate {base}->{quote} for {on.isoformat()} nor in the {self.max_age_days} days before "
            f"(nor inverse or cross via {self.pivot}); import the rate with `tokenport fx import FILE`"
        )


def corrected(rates: tuple[FxRate, ...], corrections: list[tuple[FxRate, str, str]]) -> tuple[FxRate, ...]:
    """`rates` with each (date, base, quote) that has superseding rows replaced by the latest one."""
    latest = {(r.date, r.base, r.quote): r for r, _old, _reason in corrections}
    out = [latest.get((r.date, r.base, r.quote), r) for r in rates]
    return tuple(dict.fromkeys(out))  # a rate shipped and imported alike appears once


def import_csv(text: str, *, origin: str = "<csv>") -> list[FxRate]:
    """Parse FX CSV text (see module doc). An error names the file, the line, the field and the reason."""
    out: list[FxRate] = []
    header: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        [cells] = list(csv.reader([line]))
        cells = [c.strip() for c in cells]
        if header is None:
            header = cells
            if tuple(header) != COLUMNS:
                raise FxImportError(
                    f"{origin}: line {number}: header must be {','.join(COLUMNS)}, got {','.join(cells)}"
                )
            continue
        if len(cells) != len(COLUMNS):
            raise FxImportError(
                f"{origin}: line {number}: {len(cells)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})"
            )
        values = dict(zip(COLUMNS, cells, strict=True))
        field_name = "date"
        try:
            day = date.fromisoformat(values["date"])
            field_name = "base"
            base = check_currency(values["base"])
            field_name = "quote"
            quote = check_currency(values["quote"])
            field_name = "rate"
            rate = to_decimal(values["rate"])
            check_rate(base, quote, rate)
            field_name = "source"
            if not values["source"]:
                raise ValueError("source is required")
        except (ValueError, CurrencyError, ArithmeticError) as exc:
            raise FxImportError(f"{origin}: line {number}: {field_name}: {exc}") from exc
        out.append(FxRate(day, base, quote, rate, values["source"]))
    if header is None:
        raise FxImportError(f"{origin}: no header ({','.join(COLUMNS)})")
    FxTable(tuple(out))  # refuses contradictory duplicates and inconsistent inverses
    return out


def read_text(path: str | Path) -> str:
    """A rates file's text; unreadable or not UTF-8 is an FxImportError naming the file and the byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FxImportError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise FxImportError(f"{path}: not UTF-8 (byte {exc.start}: {exc.reason})") from exc


def load_csv(path: str | Path) -> FxTable:
    return FxTable(tuple(import_csv(read_text(path), origin=str(path))))
