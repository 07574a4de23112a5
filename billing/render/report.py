"""Rendering of export reports (``tokenport reports exports --format json|csv|html``)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from jinja2 import Template

from billing.money import fmt
from billing.render.i18n import Localizer
from billing.reports import ExportReport

REPORT_FORMATS = ("json", "csv", "html")

_HTML = Template(
    """<!DOCTYPE html>
<html lang="{{ loc.language }}" dir="{{ loc.direction }}"><head><meta charset="utf-8">
<title>Token exports {{ report.period }} by {{ report.by.value }}</title>
<style>body { font-family: 'Noto Sans', 'Noto Sans CJK SC', 'Noto Sans Arabic', sans-serif; }
td.num, th.num { text-align: end; } table { border-collapse: collapse; }
th, td { padding: 2pt 6pt; border-bottom: 0.5pt solid #ccc; }</style></head>
<body><h1>Token exports {{ report.period }} by {{ report.by.value }}</h1>
<table><thead><tr><th>{{ report.by.value }}</th><th class="num">tokens</th><th class="num">revenue (CNY)</th>
<th>revenue by invoice currency</th><th class="num">documents</th></tr></thead><tbody>
{% for g in report.groups %}<tr><td>{{ g.key }}</td><td class="num">{{ loc.number(g.quantity_tokens) }}</td>
<td class="num">{{ loc.money(g.revenue_cny, 'CNY') }}</td>
<td>{% for c, v in g.revenue_by_currency %}{{ loc.money(v, c) }}{% if not loop.last %}, {% endif %}
{% endfor %}</td>
<td class="num">{{ g.documents }}</td></tr>
{% endfor %}</tbody><tfoot><tr><th>total</th><th class="num">{{ loc.number(report.quantity_tokens) }}</th>
<th class="num">{{ loc.money(report.revenue_cny, 'CNY') }}</th><th></th><th></th></tr></tfoot></table>
</body></html>
""",
    autoescape=True,
)


def report_dict(report: ExportReport) -> dict[str, Any]:
    return {
        "period": report.period,
        "by": report.by.value,
        "quantity_tokens": report.quantity_tokens,
        "revenue_cny": fmt(report.revenue_cny),
        "groups": [
            {
                "key": g.key,
                "quantity_tokens": g.quantity_tokens,
                "revenue_cny": fmt(g.revenue_cny),
                "revenue_by_currency": {c: fmt(v) for c, v in g.revenue_by_currency},
                "documents": g.documents,
            }
            for g in report.groups
        ],
    }


def render_report(report: ExportReport, fmt_name: str, *, language: str = "en") -> str:
    if fmt_name == "json":
        return json.dumps(report_dict(report), ensure_ascii=False, indent=2) + "\n"
    if fmt_name == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            [report.by.value, "quantity_tokens", "revenue_cny", "currency", "revenue", "documents"]
        )
        for g in report.groups:
            for currency, value in g.revenue_by_currency:
                writer.writerow(
                    [g.key, g.quantity_tokens, fmt(g.revenue_cny), currency, fmt(value), g.documents]
                )
        writer.writerow(["total", report.quantity_tokens, fmt(report.revenue_cny), "", "", ""])
        return out.getvalue()
    if fmt_name == "html":
        return str(_HTML.render(report=report, loc=Localizer.for_language(language)))
    raise ValueError(f"unknown report format {fmt_name!r}; choose one of {', '.join(REPORT_FORMATS)}")
