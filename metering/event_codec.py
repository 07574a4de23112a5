"""Every form of a UsageEvent, derived from its one definition (the dataclass in metering/events.py).

- the canonical hash form: the fields' values in declaration order, times as `canonical_time`,
  enums as their value (metering/chain.py hashes its compact JSON array);
- the database row (`to_db` / `from_db`), and the same values as the raw sqlite3 path binds them;
- the record: JSON-able values, times in ISO 8601 with their offset (the spool's JSON lines and the
  `tokenport usage export` rows).

The conversions go by a field's type (text, int, bool, enum, datetime, optionally None), so a field
added to the dataclass shows up in every form without touching this module. A field added after
the last required one must have a default; the canonical form leaves out such trailing fields while
they hold their defaults, so the events stored before the field existed keep their hashes.
"""

from __future__ import annotations

import enum
import functools
import operator
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from datetime import UTC, datetime
from typing import Any, Union, get_args, get_origin, get_type_hints

import orjson

from metering.clock import to_aware, to_naive
from metering.events import UsageEvent

LEGACY_RECORD_KEYS = frozenset({"extra"})  # written by older spools (an unused field, never stored): ignored

Convert = Callable[[Any], Any]


def canonical_time(value: datetime) -> str:
    """The timestamp form the hash covers: UTC, microseconds, a trailing Z."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sqlite_time(value: datetime) -> str:
    """An aware datetime as SQLAlchemy's SQLite DateTime stores it: naive UTC 'YYYY-MM-DD HH:MM:SS.ffffff'."""
    return to_naive(value).isoformat(" ", "microseconds")


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field annotation such as `str | None`."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"a UsageEvent field must have one type (or that type | None), got {hint!r}")
        return args[0], True
    return hint, False


def _enum_value(value: enum.Enum) -> Any:
    return value.value


def _bool_int(value: bool) -> int:
    return 1 if value else 0


class EventCodec:
    """The forms of one event class (UsageEvent, or in tests a class extending it)."""

    def __init__(self, cls: type[UsageEvent]) -> None:
        hints = get_type_hints(cls)
        self.cls = cls
        self.fields = fields(cls)
        self.names: tuple[str, ...] = tuple(f.name for f in self.fields)
        self.types: dict[str, type] = {}
        self.nullable: dict[str, bool] = {}
        for f in self.fields:
            self.types[f.name], self.nullable[f.name] = _base_type(hints[f.name])
        self._get = operator.attrgetter(*self.names)
        self._canonical = self._converters(time=canonical_time, enum_=_enum_value)
        self._db = self._converters(time=to_naive, enum_=_enum_value)
        self._sqlite = self._converters(time=sqlite_time, enum_=_enum_value, boolean=_bool_int)
        self._record = self._converters(time=datetime.isoformat, enum_=_enum_value)
        self._from_db = self._parsers(time=to_aware, boolean=bool)
        self._from_record = self._parsers(time=datetime.fromisoformat)
        last_required = max(
            i for i, f in enumerate(self.fields) if f.default is MISSING and f.default_factory is MISSING
        )
        # (index, canonical default) of the trailing fields with defaults, last first
        self._trailing = [
            (i, self._canonical_value(self.names[i], self.fields[i].default))
            for i in range(len(self.fields) - 1, last_required, -1)
        ]

    # --- building the conversions ------------------------------------------------------------------
    def _converters(
        self, *, time: Convert, enum_: Convert, boolean: Convert | None = None
    ) -> list[tuple[int, Convert]]:
        """(index, conversion) of the fields whose value changes in a form; the others pass as they are."""
        out: list[tuple[int, Convert]] = []
        for i, name in enumerate(self.names):
            t = self.types[name]
            if issubclass(t, datetime):
                out.append((i, time))
            elif issubclass(t, enum.Enum):
                out.append((i, enum_))
            elif t is bool and boolean is not None:
                out.append((i, boolean))
            elif t not in (str, int, bool):
                raise TypeError(f"UsageEvent.{name}: no codec for {t!r}")
        return out

    def _parsers(self, *, time: Convert, boolean: Convert | None = None) -> list[tuple[str, Convert]]:
        out: list[tuple[str, Convert]] = []
        for name in self.names:
            t = self.types[name]
            if issubclass(t, datetime):
                out.append((name, time))
            elif issubclass(t, enum.Enum):
                out.append((name, t))
            elif t is bool and boolean is not None:
                out.append((name, boolean))
        return out

    def _values(self, event: UsageEvent, conversions: list[tuple[int, Convert]]) -> list[Any]:
        values = list(self._get(event))
        for i, convert in conversions:
            if values[i] is not None:
                values[i] = convert(values[i])
        return values

    def _canonical_value(self, name: str, value: Any) -> Any:
        for i, convert in self._canonical:
            if self.names[i] == name and value is not None:
                return convert(value)
        return value

    # --- the forms ---------------------------------------------------------------------------------
    def canonical(self, event: UsageEvent) -> list[Any]:
        """The values the hash covers, in order (trailing fields at their defaults left out)."""
        return self.trim(self._values(event, self._canonical))

    def canonical_fields(self, event: UsageEvent) -> dict[str, Any]:
        """Every field in its canonical form, by name (what a tenant downloads to recompute the hash)."""
        return dict(zip(self.names, self._values(event, self._canonical), strict=True))

    def trim(self, values: list[Any]) -> list[Any]:
        for i, default in self._trailing:
            if values[i] != default:
                break
            del values[i]
        return values

    def to_db(self, event: UsageEvent) -> dict[str, Any]:
        return dict(zip(self.names, self._values(event, self._db), strict=True))

    def sqlite_values(self, event: UsageEvent) -> list[Any]:
        """`to_db`'s values in field order, as the raw sqlite3 path binds them (SQLAlchemy's own forms)."""
        return self._values(event, self._sqlite)

    def from_db(self, row: Mapping[Any, Any]) -> UsageEvent:
        values = {name: row[name] for name in self.names}
        return self._build(values, self._from_db)

    def to_record(self, event: UsageEvent) -> dict[str, Any]:
        return dict(zip(self.names, self._values(event, self._record), strict=True))

    def from_record(self, record: Mapping[str, Any]) -> UsageEvent:
        values = {k: v for k, v in record.items() if k not in LEGACY_RECORD_KEYS}
        return self._build(values, self._from_record)

    def to_json(self, event: UsageEvent) -> bytes:
        return orjson.dumps(self.to_record(event))

    def from_json(self, raw: bytes) -> UsageEvent:
        record = orjson.loads(raw)
        if not isinstance(record, dict):
            raise TypeError("a usage event in JSON is an object")
        return self.from_record(record)

    def _build(self, values: dict[str, Any], parsers: list[tuple[str, Convert]]) -> UsageEvent:
        for name, parse in parsers:
            value = values.get(name)
            if value is not None:
                values[name] = parse(value)
        return self.cls(**values)


@functools.cache
def codec() -> EventCodec:
    """The codec of UsageEvent (built once, on first use)."""
    return EventCodec(UsageEvent)
