"""Language premiums as versioned, dated data: what an English-equivalent tariff divides tokens by.

The file (default ``configs/billing/language_premiums.csv``) is a CSV with the columns
``language,tokenizer,premium,source,measured_on``: the premium of a language on a tokenizer (a served
model's name, or a reference tokenizer's) against English, where it came from, and the day it was
measured. Like FX rates, old rows stay: a new measurement adds rows with a new date, and
`PremiumTable.lookup` answers the latest premium measured on or before a given day, so an invoice for
a past period can be re-rendered with the factors in force then. Lines starting with ``#`` are comments.

`premiums_from` turns a `metering.tokentax.MeasureResult` into rows, `write_premiums` merges them into
the file (replacing only rows of the same language, tokenizer and date), `load_premiums` reads and
validates it: an error names the file, the line, the field and the reason.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path

from metering.tokentax import MeasureResult

COLUMNS = ("language", "tokenizer", "premium", "source", "measured_on")
MAX_PREMIUM = Decimal(100)  # a factor beyond this is a broken measurement, not a language
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
HEADER_COMMENT = (
    "# Token premium of each language against English, per tokenizer (served model or reference), dated.\n"
    "# Written by metering.language_premiums.write_premiums from `tokenport languages measure`;\n"
    "# English-equivalent tariffs bill tokens / premium (the latest row measured on or before the day).\n"
)


class PremiumFileError(ValueError):
    def __init__(self, file: str, line: int, field: str, reason: str) -> None:
        super().__init__(f"{file}:{line}: {field}: {reason}")
        self.file, self.line, self.field, self.reason = file, line, field, reason


@dataclass(frozen=True)
class Premium:
    language: str
    tokenizer: str
    premium: Decimal
    source: str
    measured_on: date

    @property
    def key(self) -> tuple[str, str, date]:
        return self.language, self.tokenizer, self.measured_on


@dataclass(frozen=True)
class PremiumTable:
    rows: tuple[Premium, ...]

    def lookup(self, language: str, tokenizer: str, on: date | None = None) -> Premium | None:
        """The latest premium of (language, tokenizer) measured on or before `on` (default: any day)."""
        found = [
            r
            for r in self.rows
            if r.language == language and r.tokenizer == tokenizer and (on is None or r.measured_on <= on)
        ]
        return max(found, key=lambda r: r.measured_on) if found else None

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.tokenizer for r in self.rows))


def premiums_from(result: MeasureResult, measured_on: date, source: str) -> list[Premium]:
    """One row per (tokenizer, language) of a measurement that has a premium (English: 1.000)."""
    return [
        Premium(m.language, m.tokenizer, m.premium, source, measured_on)
        for m in result.rows
        if m.premium is not None
    ]


def render_premiums(rows: Iterable[Premium]) -> str:
    buf = io.StringIO()
    buf.write(HEADER_COMMENT)
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in sorted(rows, key=lambda r: (r.tokenizer, r.measured_on, r.language)):
        writer.writerow([r.language, r.tokenizer, str(r.premium), r.source, r.measured_on.isoformat()])
    return buf.getvalue()


def merge(existing: Sequence[Premium], new: Sequence[Premium]) -> list[Premium]:
    """`existing` with the rows of `new` added; a row of the same language, tokenizer and day is replaced."""
    replaced = {r.key for r in new}
    return [r for r in existing if r.key not in replaced] + list(new)


def write_premiums(path: Path, result: MeasureResult, measured_on: date, source: str) -> PremiumTable:
    """Merge a measurement into the premium file (created if absent), atomically; returns the new table."""
    old = load_premiums(path).rows if path.exists() else ()
    rows = merge(old, premiums_from(result, measured_on, source))
    text = render_premiums(rows)
    table = parse_premiums(text, str(path))  # never write a file the loader would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return table


def load_premiums(path: Path) -> PremiumTable:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PremiumFileError(str(path), 0, "file", f"cannot read ({exc.strerror or exc})") from exc
    return parse_premiums(text, str(path))


def parse_premiums(text: str, label: str = "<premiums>") -> PremiumTable:
    lines = [
        (n, line)
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise PremiumFileError(label, 0, "header", f"empty file (expected {','.join(COLUMNS)})")
    numbers = [n for n, _ in lines]
    records = list(csv.reader(line for _, line in lines))
    if tuple(records[0]) != COLUMNS:
        raise PremiumFileError(label, numbers[0], "header", f"expected {','.join(COLUMNS)}")
    rows: list[Premium] = []
    seen: set[tuple[str, str, date]] = set()
    for number, record in zip(numbers[1:], records[1:], strict=True):
        row = _row(label, number, record)
        if row.key in seen:
            raise PremiumFileError(
                label,
                number,
                "measured_on",
                f"{row.language}/{row.tokenizer} already has a premium for {row.measured_on}",
            )
        seen.add(row.key)
        rows.append(row)
    return PremiumTable(tuple(rows))


def _row(label: str, number: int, record: list[str]) -> Premium:
    if len(record) != len(COLUMNS):
        raise PremiumFileError(label, number, "row", f"{len(record)} fields, expected {len(COLUMNS)}")
    language, tokenizer, premium_text, source, day = record

    def fail(field: str, reason: str) -> PremiumFileError:
        return PremiumFileError(label, number, field, reason)

    if not _LANGUAGE.match(language):
        raise fail("language", f"{language!r} is not a lowercase ISO 639 code")
    if not tokenizer or tokenizer != tokenizer.strip():
        raise fail("tokenizer", "empty or padded with spaces")
    try:
        premium = Decimal(premium_text)
    except InvalidOperation:
        raise fail("premium", f"{premium_text!r} is not a number") from None
    if not premium.is_finite() or not Decimal(0) < premium <= MAX_PREMIUM:
        raise fail("premium", f"{premium_text} is not in (0, {MAX_PREMIUM}]")
    if language == "en" and premium != 1:
        raise fail("premium", "English is the baseline: its premium is 1")
    if not source.strip():
        raise fail("source", "empty (say where the figure comes from)")
    if not _DATE.match(day):
        raise fail("measured_on", f"{day!r} is not a YYYY-MM-DD date")
    try:
        measured_on = date.fromisoformat(day)
    except ValueError as exc:
        raise fail("measured_on", str(exc)) from None
    return Premium(language, tokenizer, premium, source, measured_on)
