"""PDF from the HTML rendering (WeasyPrint; fonts: Noto Sans, Noto Sans CJK SC, Noto Sans Arabic)."""

from __future__ import annotations

from weasyprint import HTML

from billing.documents import CreditNote, Invoice
from billing.render.html import to_html


def to_pdf(doc: Invoice | CreditNote, *, language: str | None = None) -> bytes:
    pdf = HTML(string=to_html(doc, language=language)).write_pdf()
    assert pdf is not None
    return bytes(pdf)
