"""A prepaid-credit receipt (billing/credits.py) as HTML and PDF, in the buyer's language.

The receipt says what was received, from whom, when and under which reference, and that it is a
prepayment credited to the buyer's balance and applied to its invoices (not a tax invoice: the tax is
on each month's invoice). Rendered from the stored grant, so the same receipt always gives the same
bytes (billing/render/pdf.py pins the timestamps to the receipt's day).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from typing import Any

from billing.parties import Buyer, Seller
from billing.render.html import _environment
from billing.render.i18n import Localizer
from billing.render.pdf import html_to_pdf


def receipt_html(grant: Mapping[str, Any], seller: Seller, buyer: Buyer, language: str | None = None) -> str:
    loc = Localizer.for_language(language or buyer.language)
    return (
        _environment()
        .get_template("receipt.html")
        .render(
            r=grant,
            day=receipt_day(grant),
            amount=Decimal(str(grant["amount"])),
            seller=seller,
            buyer=buyer,
            loc=loc,
            t=loc.t,
        )
    )


def receipt_pdf(grant: Mapping[str, Any], seller: Seller, buyer: Buyer, language: str | None = None) -> bytes:
    return html_to_pdf(receipt_html(grant, seller, buyer, language), day=receipt_day(grant))


def receipt_day(grant: Mapping[str, Any]) -> date:
    return date.fromisoformat(str(grant["recorded_at"])[:10])
