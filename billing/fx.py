"""FX rate tables with source and date. A missing rate is an error, never "the latest rate".

CSV format (``configs/billing/fx_rates.csv``; ``tokenport fx import FILE`` uses ``import_csv``)::

    # comment lines start with '#'
    date,base,quote,rate,source
    2026-01-01,USD,CNY,7.0288,sample:PBOC-central-parity

meaning ``1 base = rate quote`` on ``date`` as published by ``source``.

Lookup ``FxTable.rate(from, to, on)`` uses, in this order and for the exact date only:
the direct rate; the inverse of the opposite rate; a cross rate through the pivot currency (USD).
Derived rates are computed exactly, rounded once to 10 decimal places (ROUND_HALF_UP), and their
source says how they were derived; the rate recorded on a document is exactly the rate used.

Which date applies is the tax rule's ``FxDateRule`` (``fx_date``): SA VAT uses the rate of the tax
point date; the Chinese ledger uses the PBoC central parity of the first day of the month (or of
the issue date, a per-entity choice kept for at least a year).
"""

from __future__ import annotations

import csv
import enum
import io
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from billing.errors import FxImportError, FxRateMissing
from billing.money import CurrencyError, check_currency, div, mul, to_decimal

RATE_PLACES = Decimal("1E-10")
COLUMNS = ("date", "base", "quote", "rate", "source")


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

    def with_rates(self, more: list[FxRate]) -> FxTable:
        return FxTable(self.rates + tuple(more), self.pivot)

    def _leg(self, base: str, quote: str, on: date) -> tuple[Decimal, str] | None:
        """The exact (unrounded) rate base->quote on ``on`` from a direct or opposite row."""
        hit = self._index.get((on, base, quote))
        if hit is not None:
            return hit.rate, hit.source
        inverse = self._index.get((on, quote, base))
        if inverse is not None:
            return div(Decimal(1), inverse.rate), f"inverse:{inverse.source}"
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
            exact = mul(*(rate for rate, _ in found))
            sources = [source for _, source in found]
            source = sources[0] if len(sources) == 1 else f"cross:{self.pivot}({';'.join(sources)})"
            return FxRate(on, base, quote, exact.quantize(RATE_PLACES, ROUND_HALF_UP), source)
        raise FxRateMissing(
            f"no FX rate {base}->{quote} for {on.isoformat()} (nor inverse or cross via {self.pivot});"
            f" import the rate for that exact date with `tokenport fx import FILE`"
        )


def import_csv(text: str, *, origin: str = "<csv>") -> list[FxRate]:
    """Parse FX CSV text (see module doc). Errors name the data row and what is wrong."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    if reader.fieldnames is None or tuple(f.strip() for f in reader.fieldnames) != COLUMNS:
        raise FxImportError(f"{origin}: header must be {','.join(COLUMNS)}, got {reader.fieldnames}")
    out: list[FxRate] = []
    for number, row in enumerate(reader, start=2):
        where = f"{origin}: data row {number - 1}"
        try:
            values = {k.strip(): (v or "").strip() for k, v in row.items()}
            rate = to_decimal(values["rate"])
            if rate <= 0:
                raise ValueError("rate must be positive")
            if not values["source"]:
                raise ValueError("source is required")
            out.append(
                FxRate(
                    date.fromisoformat(values["date"]),
                    check_currency(values["base"]),
                    check_currency(values["quote"]),
                    rate,
                    values["source"],
                )
            )
        except (ValueError, CurrencyError, AttributeError) as exc:
            raise FxImportError(f"{where}: {exc}") from exc
    FxTable(tuple(out))  # refuses contradictory duplicates
    return out


def load_csv(path: str | Path) -> FxTable:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FxImportError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return FxTable(tuple(import_csv(text, origin=str(path))))
