"""PDF from the HTML rendering (WeasyPrint; fonts: Noto Sans, Noto Sans CJK SC, Noto Sans Arabic).

Reproducible: the same document (and language and void reference) renders to the same bytes every
time. The PDF's dates are the issue date (HTML ``dcterms.created``/``modified`` metadata), its /ID is
derived from the rendered HTML, and fonts are subset by HarfBuzz, which is deterministic; without
libharfbuzz-subset WeasyPrint falls back to fontTools, which stamps the subset fonts' ``head``
table with the current time unless SOURCE_DATE_EPOCH is set, so it is pinned (to the issue date) for
the duration of the render. Fails loudly (fonts.MissingFonts) instead of drawing boxes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time

from weasyprint import HTML

from billing.documents import CreditNote, Invoice
from billing.render.fonts import check_drawn
from billing.render.html import to_html

# SOURCE_DATE_EPOCH is process state: renders that set it take turns.
_EPOCH_LOCK = threading.Lock()


@contextmanager
def pinned_timestamps(day: date) -> Iterator[None]:
    """SOURCE_DATE_EPOCH = ``day`` 00:00 UTC while rendering (fontTools reads it), then restored."""
    epoch = str(int(datetime.combine(day, time(0), tzinfo=UTC).timestamp()))
    with _EPOCH_LOCK:
        before = os.environ.get("SOURCE_DATE_EPOCH")
        os.environ["SOURCE_DATE_EPOCH"] = epoch
        try:
            yield
        finally:
            if before is None:
                del os.environ["SOURCE_DATE_EPOCH"]
            else:
                os.environ["SOURCE_DATE_EPOCH"] = before


def pdf_identifier(html: str) -> bytes:
    return hashlib.sha256(html.encode("utf-8")).hexdigest()[:32].encode("ascii")


def html_to_pdf(html: str, *, day: date) -> bytes:
    """Render ``html`` reproducibly; raises MissingFonts when a character has no font."""
    with pinned_timestamps(day):
        document = HTML(string=html).render()
        pdf = document.write_pdf(pdf_identifier=pdf_identifier(html))
    check_drawn(document.fonts)
    assert pdf is not None
    return bytes(pdf)


def to_pdf(
    doc: Invoice | CreditNote, *, language: str | None = None, void_reference: str | None = None
) -> bytes:
    html = to_html(doc, language=language, void_reference=void_reference)
    return html_to_pdf(html, day=doc.issue_date)
