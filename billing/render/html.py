"""HTML invoice / credit note in the buyer's language (Jinja2 template shipped as package data).

Right-to-left languages (ar) get ``dir="rtl"``; labels come from templates/messages.yaml, numbers,
dates and currencies from Babel for the buyer's locale; a Saudi buyer's document carries the ZATCA
phase-1 QR code. The CSS font stack ('Noto Sans', 'Noto Sans CJK SC', 'Noto Sans Arabic') covers
Latin, Cyrillic, CJK and Arabic when rendered to PDF by WeasyPrint.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, select_autoescape

from billing.documents import CreditNote, DocumentStatus, Invoice, InvoiceLine, LineKind
from billing.render.i18n import Localizer
from billing.render.zatca import document_qr, qr_png_data_uri


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("billing.render", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def line_description(line: InvoiceLine, loc: Localizer) -> str:
    if line.kind is LineKind.MINIMUM_COMMITMENT:
        return loc.t("minimum_commitment")
    assert line.token_type is not None
    parts = [f"{line.model} — {loc.t(line.token_type.value)}"]
    if line.tier is not None:
        parts.append(f"{loc.t('tier')} {line.tier} ({loc.t(line.tier_mode or '')})")
    if line.adjustment:
        parts.append(loc.t("adjustment"))
    return "; ".join(parts)


def to_html(doc: Invoice | CreditNote, *, language: str | None = None) -> str:
    """The document as a standalone HTML page in ``language`` (default: the buyer's)."""
    loc = Localizer.for_language(language or doc.buyer.language)
    qr = None
    if doc.buyer.billing_country == "SA":
        payload = document_qr(doc)
        qr = {"payload": payload, "image": qr_png_data_uri(payload)}
    return (
        _environment()
        .get_template("invoice.html")
        .render(
            doc=doc,
            loc=loc,
            t=loc.t,
            credit=isinstance(doc, CreditNote),
            draft=doc.status is DocumentStatus.DRAFT,
            describe=lambda line: line_description(line, loc),
            qr=qr,
        )
    )
