"""Rendering of export reports (``tokenport reports exports --format json|csv|html``).

The HTML report is in the reader's language (en, zh, ru, ar, kk, uz, tr: labels from
templates/messages.yaml, numbers and country names from Babel); json and csv keep their stable
machine-readable English field names.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from jinja2 import Template
from markupsafe import Markup, escape

from billing.money import fmt
from billing.render.bidi import fill, isolate, ltr
from billing.render.i18n import Localizer
from billing.reports import ExportReport

REPORT_FORMATS = ("json", "csv", "html")

_HTML = Template(
    """<!DOCTYPE html>
<html lang="{{ loc.language }}" dir="{{ loc.direction }}"><head><meta charset="utf-8">
<title>{{ t('report_title', period=report.period) }}</title>
<style>body { font-family: 'Noto Sans', 'Noto Sans CJK SC', 'Noto Sans Arabic', sans-serif; }
td.num, th.num { text-align: end; } table { border-collapse: collapse; } bdi { unicode-bidi: isolate; }
th, td { padding: 2pt 6pt; border-bottom: 0.5pt solid #ccc; text-align: start; }</style></head>
<body><h1>{{ title }}</h1>
<table><thead><tr><th>{{ by_label }}</th><th class="num">{{ t('quantity') }}</th>
<th class="num">{{ t('revenue_cny') }}</th><th>{{ t('revenue_by_currency') }}</th>
<th class="num">{{ t('documents') }}</th></tr></thead><tbody>
{% for g in report.groups %}<tr><td>{{ key(g.key) }}</td>
<td class="num">{{ ltr(loc.number(g.quantity_tokens)) }}</td>
<td class="num">{{ ltr(loc.money(g.revenue_cny, 'CNY')) }}</td>
<td>{% for c, v in g.revenue_by_currency %}{{ ltr(loc.money(v, c)) }}{% if not loop.last %}, {% endif %}
{% endfor %}</td>
<td class="num">{{ ltr(loc.number(g.documents)) }}</td></tr>
{% endfor %}</tbody><tfoot><tr><th>{{ t('total') }}</th>
<th class="num">{{ ltr(loc.number(report.quantity_tokens)) }}</th>
<th class="num">{{ ltr(loc.money(report.revenue_cny, 'CNY')) }}</th><th></th><th></th></tr></tfoot></table>
</body></html>
""",
    autoescape=True,
)


def _html(report: ExportReport, language: str) -> str:
    loc = Localizer.for_language(language)
    by = report.by.value
    by_key = f"by_{by}"
    countries = by.endswith("country")

    def key(value: str) -> Markup:
        if countries and len(value) == 2 and value.isalpha() and value.isupper():
            return escape(loc.country(value)) + Markup(" (") + isolate(value) + Markup(")")
        return isolate(value)

    return str(
        _HTML.render(
            report=report,
            loc=loc,
            t=loc.t,
            ltr=ltr,
            key=key,
            title=fill(loc.t("report_title"), period=report.period),
            by_label=loc.t(by_key) if loc.has(by_key) else by,
        )
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
        # one row per group and currency, each with its own share: every numeric column adds up to the
        # total row (a group's totals are never repeated on its currency rows; documents are not additive)
        for g in report.groups:
            for s in g.shares:
                writer.writerow(
                    [g.key, s.quantity_tokens, fmt(s.revenue_cny), s.currency, fmt(s.revenue), s.documents]
                )
        writer.writerow(["total", report.quantity_tokens, fmt(report.revenue_cny), "", "", ""])
        return out.getvalue()
    if fmt_name == "html":
        return _html(report, language)
    raise ValueError(f"unknown report format {fmt_name!r}; choose one of {', '.join(REPORT_FORMATS)}")
