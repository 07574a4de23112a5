"""The token-tax report from real traffic: per language and model, what the ledger metered.

`tokenport reports languages`, `GET /admin/v1/reports/languages` and a tenant's `GET /v1/usage/languages`
answer with this one report (`build`, then `as_dict` / `render`):

- `requests`, `prompt_tokens`, `completion_tokens`, `total_tokens`: every event of the period;
- `characters` (and `bytes`): the prompt's and completion's text size of the `ok` events that carry
  it (events recorded before text sizes existed carry none), `measured_requests` of them;
- `tokens_per_1k_chars`: the tokens of those same events per 1,000 characters;
- `premium_vs_en`: that figure divided by English's on the same model (None without English traffic
  on that model). It is a per-character premium: a language denser per character (Chinese: about a
  third of English's characters for the same meaning) shows a higher per-character figure than its
  per-meaning token tax (`tokenport languages measure` measures that one on a parallel corpus).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import orjson
from markupsafe import escape

from metering.clock import Period
from metering.store_sql import UsageStore

BASELINE = "en"
UNDETERMINED = "und"
FORMATS = ("json", "csv", "html")
BASIS = (
    "tokens per 1,000 characters of prompt and completion text, over the ok requests that carry text "
    "sizes; premium_vs_en = that figure / English's on the same model"
)
COLUMNS = (
    "language",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "measured_requests",
    "characters",
    "prompt_characters",
    "completion_characters",
    "bytes",
    "tokens_per_1k_chars",
    "premium_vs_en",
)


@dataclass(frozen=True)
class LanguageRow:
    language: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    measured_requests: int
    characters: int
    prompt_characters: int
    completion_characters: int
    bytes: int
    tokens_per_1k_chars: Decimal | None
    premium_vs_en: Decimal | None


@dataclass(frozen=True)
class LanguageReport:
    period: str
    model: str | None
    tenant_id: str | None
    rows: tuple[LanguageRow, ...]


def _q(value: Decimal, places: str) -> Decimal:
    return value.quantize(Decimal(places), rounding=ROUND_HALF_EVEN)


def build(
    totals: Sequence[Mapping[str, Any]],
    *,
    period: str,
    model: str | None = None,
    tenant_id: str | None = None,
) -> LanguageReport:
    """The report from `UsageStore.language_totals` rows."""
    exact: dict[tuple[str, str], Decimal | None] = {}
    for t in totals:
        chars = int(t["prompt_chars"]) + int(t["completion_chars"])
        tokens = int(t["sized_prompt_tokens"]) + int(t["sized_completion_tokens"])
        exact[(t["language"] or UNDETERMINED, t["model"])] = (
            Decimal(tokens * 1000) / Decimal(chars) if chars else None
        )
    rows = []
    for t in totals:
        language, m = t["language"] or UNDETERMINED, t["model"]
        tpk, base = exact[(language, m)], exact.get((BASELINE, m))
        rows.append(
            LanguageRow(
                language=language,
                model=m,
                requests=int(t["requests"]),
                prompt_tokens=int(t["prompt_tokens"]),
                completion_tokens=int(t["completion_tokens"]),
                total_tokens=int(t["prompt_tokens"]) + int(t["completion_tokens"]),
                measured_requests=int(t["sized_requests"]),
                characters=int(t["prompt_chars"]) + int(t["completion_chars"]),
                prompt_characters=int(t["prompt_chars"]),
                completion_characters=int(t["completion_chars"]),
                bytes=int(t["prompt_bytes"]) + int(t["completion_bytes"]),
                tokens_per_1k_chars=None if tpk is None else _q(tpk, "0.01"),
                premium_vs_en=None if tpk is None or not base else _q(tpk / base, "0.001"),
            )
        )
    rows.sort(key=lambda r: (r.model, r.language != BASELINE, r.language))
    return LanguageReport(period=period, model=model, tenant_id=tenant_id, rows=tuple(rows))


def _json_value(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


def as_dict(report: LanguageReport) -> dict[str, Any]:
    """The one output schema (JSON) of the CLI, the admin report and the tenant's view."""
    out: dict[str, Any] = {
        "object": "language_report",
        "period": report.period,
        "model": report.model,
        "baseline": BASELINE,
        "basis": BASIS,
        "data": [{k: _json_value(v) for k, v in asdict(r).items()} for r in report.rows],
    }
    if report.tenant_id is not None:
        out["tenant_id"] = report.tenant_id
    return out


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def render(report: LanguageReport, fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(as_dict(report)).decode() + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in report.rows:
            w.writerow([_cell(getattr(r, c)) for c in COLUMNS])
        return buf.getvalue()
    if fmt == "html":
        head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{escape(_cell(getattr(r, c)))}</td>" for c in COLUMNS) + "</tr>\n"
            for r in report.rows
        )
        title = escape(
            f"Token premium by language, {report.period}" + (f", {report.model}" if report.model else "")
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f"<body><h1>{title}</h1><p>{escape(BASIS)}</p>\n<table><thead><tr>{head}</tr></thead><tbody>\n"
            f"{body}</tbody></table></body></html>\n"
        )
    raise ValueError(f"format must be one of {', '.join(FORMATS)}")


def language_report(
    usage: UsageStore, period: Period, *, model: str | None = None, tenant_id: str | None = None
) -> LanguageReport:
    """The period's report from the ledger (every tenant, or one tenant's own)."""
    totals = usage.language_totals(start=period.start_at, end=period.end_at, tenant_id=tenant_id, model=model)
    return build(totals, period=str(period), model=model, tenant_id=tenant_id)
