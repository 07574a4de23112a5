"""Reading the usage ledger for billing: seq-bounded slices of events of a period (metering.clock.Period).

Only the metering read API is used (``UsageStore.iter_events``: events in ledger ``seq`` order).
Appends to the ledger are serialized and ``seq`` grows in commit order, so one pass in ``seq``
order that has seen up to ``seq = hi`` has seen *every* matching event with ``seq <= hi``; events
committed later have a larger ``seq``. That is what lets an invoice record "I billed the events of
(tenant, period) with ``seq`` in (lo, hi]" and late usage be found as the events above ``hi``.

A slice aggregates events into ``UsageQuantity`` rows per (model, token type, origin country,
language, batch: a Batch API line, endpoint ``batch.*``) and keeps the ledger hash of every event, for the
invoice's usage digest::

    usage_digest = "sha256:" + sha256("\\n".join(sorted(event hashes))).hexdigest()
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date
from decimal import Decimal
from typing import Any

from billing.engine import UsageQuantity
from billing.errors import InvalidUsage
from billing.tariffs import UNIT_TOKEN, Billed, Converter, half_up
from metering.clock import InvalidPeriod
from metering.clock import Period as Period
from metering.events import TOKEN_TYPES, TokenType, is_batch
from metering.store_sql import StoredEvent, UsageStore


def parse_period(text: str) -> Period:
    """A billing period typed by a user: `Period.parse`, with a bad text as billing's InvalidUsage (4xx)."""
    try:
        return Period.parse(text)
    except InvalidPeriod as exc:
        raise InvalidUsage(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class SeqRange:
    """Ledger events of one tenant and period with ``lo < seq <= hi``."""

    period: str
    lo: int
    hi: int


@dataclass
class Slice:
    """Events of one tenant read for one invoice, aggregated."""

    quantities: dict[tuple[str, TokenType, str, str | None, bool], int] = field(default_factory=dict)
    hashes: list[str] = field(default_factory=list)
    ranges: dict[str, SeqRange] = field(default_factory=dict)
    by_period: dict[str, dict[tuple[str, TokenType], int]] = field(default_factory=dict)  # period -> tokens
    by_day: dict[date, dict[tuple[str, TokenType], int]] = field(default_factory=dict)  # UTC day -> tokens
    # The tenant's tariff (billing/tariffs.py): each event's billed units. by_period and by_day then
    # hold billed units (what is priced); `quantities` stays in tokens (reports, verification).
    convert: Converter | None = None
    tenant_seqs: list[int] = field(default_factory=list)  # the events' positions among the tenant's
    # one invoice line each, whatever the events' origins: (model, type, language, batch, unit, the
    # premium row) -> [exact units, raw tokens, factor, premium row]; rounded once per line
    billed: dict[tuple[str, TokenType, str | None, bool, str, str | None], list[Any]] = field(
        default_factory=dict
    )

    def add(self, stored: StoredEvent, period: str, lo: int) -> None:
        e = stored.event
        self.tenant_seqs.append(stored.tenant_seq)
        mine = self.by_period.setdefault(period, {})
        day = self.by_day.setdefault(e.started_at.astimezone(UTC).date(), {})
        batch = is_batch(e.endpoint)
        units = self.convert(e) if self.convert is not None else None
        for token_type, n in e.tokens_by_type().items():
            if n:
                key = (e.model, token_type, e.origin_country, e.language, batch)
                self.quantities[key] = self.quantities.get(key, 0) + n
                b = units[token_type] if units is not None else Billed(Decimal(n), n, UNIT_TOKEN)
                mine[(e.model, token_type)] = mine.get((e.model, token_type), 0) + b.units
                day[(e.model, token_type)] = day.get((e.model, token_type), 0) + b.units
                line = (e.model, token_type, e.language, batch, b.unit, b.factor_source)
                acc = self.billed.setdefault(line, [Decimal(0), 0, b.factor, b.factor_source])
                acc[0] += b.exact  # rounded once, per line (billed_rows)
                acc[1] += n
        self.hashes.append(stored.hash)
        seen = self.ranges.get(period)
        self.ranges[period] = SeqRange(period, lo if seen is None else seen.lo, stored.seq)

    @property
    def events(self) -> int:
        return len(self.hashes)

    def rows(self) -> list[UsageQuantity]:
        order = {t: i for i, t in enumerate(TOKEN_TYPES)}
        return [
            UsageQuantity(model, token_type, n, origin, language, batch)
            for (model, token_type, origin, language, batch), n in sorted(
                self.quantities.items(),
                key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2], kv[0][3] or "", kv[0][4]),
            )
        ]

    def billed_rows(self) -> list[UsageQuantity]:
        """What is priced: `rows()` on a tokens tariff; billed units per language under another."""
        if all(k[4] == UNIT_TOKEN for k in self.billed):
            return self.rows()
        return [
            UsageQuantity(model, tt, half_up(units), None, language, batch, unit, raw, factor, source)
            for (model, tt, language, batch, unit, _row), (units, raw, factor, source) in sorted(
                self.billed.items(), key=lambda kv: tuple(str(x) for x in kv[0])
            )
        ]


def event_digest(hashes: Iterable[str]) -> str:
    """The usage digest of an invoice: sha256 over the sorted ledger hashes of the events it bills."""
    return "sha256:" + hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def events_in(
    usage: UsageStore, period: Period, *, tenant_id: str | None = None, after_seq: int = 0
) -> Iterator[StoredEvent]:
    """Events that started in ``period`` (UTC), optionally of one tenant, with seq > after_seq."""
    return usage.iter_events(
        tenant_id=tenant_id, start=period.start_at, end=period.end_at, after_seq=after_seq
    )


def events_in_ranges(usage: UsageStore, tenant_id: str, ranges: Iterable[SeqRange]) -> Iterator[StoredEvent]:
    """Exactly the events an invoice recorded as billed: (tenant, period, lo < seq <= hi)."""
    for r in ranges:
        for stored in events_in(usage, Period.parse(r.period), tenant_id=tenant_id, after_seq=r.lo):
            if stored.seq > r.hi:
                break
            yield stored


def billed_quantities(
    usage: UsageStore, tenant_id: str, period: Period, upto: int, convert: Converter | None = None
) -> dict[tuple[str, TokenType], int]:
    """Units (tokens, or billed units under the tenant's tariff) per (model, token type) of the tenant's
    events of `period` with ``seq <= upto`` (already invoiced)."""
    out: dict[tuple[str, TokenType], int] = {}
    if upto <= 0:
        return out
    for stored in events_in(usage, period, tenant_id=tenant_id):
        if stored.seq > upto:
            break
        units = convert(stored.event) if convert is not None else None
        for token_type, n in stored.event.tokens_by_type().items():
            if n:
                key = (stored.event.model, token_type)
                out[key] = out.get(key, 0) + (units[token_type].units if units is not None else n)
    return out


def rows_of(quantities: Iterable[UsageQuantity]) -> list[dict[str, object]]:
    """UsageQuantity rows as JSON-ready dicts (stored with each invoice for reports)."""
    return [
        {
            "model": q.model,
            "token_type": q.token_type.value,
            "quantity_tokens": q.quantity_tokens,
            "origin_country": q.origin_country,
            "language": q.language,
            **({"batch": True} if q.batch else {}),
        }
        for q in quantities
    ]


def rows_from(data: Iterable[dict[str, object]]) -> list[UsageQuantity]:
    return [
        UsageQuantity(
            str(d["model"]),
            TokenType(str(d["token_type"])),
            int(str(d["quantity_tokens"])),
            None if d.get("origin_country") is None else str(d["origin_country"]),
            None if d.get("language") is None else str(d["language"]),
            d.get("batch") is True,
        )
        for d in data
    ]
