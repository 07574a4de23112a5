"""Renderers: json, csv, html, pdf, ubl (UBL 2.1) and the ZATCA phase-1 QR.

``render(document, fmt)`` returns bytes for any of ``FORMATS``. ``language`` overrides the buyer's
document language and ``void_reference`` (the cancelling credit note's number) marks an html/pdf
rendering VOID. PDFs are reproducible and fail loudly (fonts.MissingFonts) rather than print boxes.
"""

from __future__ import annotations

from billing.documents import CreditNote, Invoice

FORMATS = ("json", "csv", "html", "pdf", "ubl")


def render(
    document: Invoice | CreditNote,
    fmt: str,
    *,
    language: str | None = None,
    void_reference: str | None = None,
) -> bytes:
    if fmt == "json":
        from billing.render.jsondoc import to_json

        return to_json(document)
    if fmt == "csv":
        from billing.render.csvdoc import to_csv

        return to_csv(document).encode("utf-8")
    if fmt == "html":
        from billing.render.html import to_html

        return to_html(document, language=language, void_reference=void_reference).encode("utf-8")
    if fmt == "pdf":
        from billing.render.pdf import to_pdf

        return to_pdf(document, language=language, void_reference=void_reference)
    if fmt == "ubl":
        from billing.render.ubl import to_ubl

        return to_ubl(document)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
