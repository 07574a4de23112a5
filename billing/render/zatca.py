"""KSA ZATCA phase-1 ("generation") QR code: Base64 of TLV (1-byte tag, 1-byte length, UTF-8 value).

Tags 1-5: seller name, seller VAT number, timestamp (ISO 8601), invoice total with VAT, VAT total.
For a document in another currency than SAR, tags 4 and 5 carry the SAR amounts recorded on the
document (tax currency SAR, rate recorded as an FxUse): the VAT amount must be stated in SAR
(Implementing Regulations Art. 53(5)(j)). Tag 2 is the seller's KSA VAT number when registered,
else its home tax id (reverse-charge supplies are not e-invoiced by a non-resident supplier; the QR
is informative there). The timestamp is the issue date at 00:00:00Z: the engine has no clock.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import segno

from billing.documents import CreditNote, Invoice
from billing.money import fmt, round_money


def tlv_base64(fields: Sequence[tuple[int, str]]) -> str:
    out = bytearray()
    for tag, value in fields:
        raw = value.encode("utf-8")
        if not 1 <= tag <= 255:
            raise ValueError(f"TLV tag {tag} does not fit in one byte")
        if len(raw) > 255:
            raise ValueError(f"TLV value of tag {tag} is {len(raw)} bytes; at most 255")
        out += bytes((tag, len(raw))) + raw
    return base64.b64encode(bytes(out)).decode("ascii")


def decode_tlv(payload: str) -> list[tuple[int, str]]:
    raw = base64.b64decode(payload, validate=True)
    fields: list[tuple[int, str]] = []
    i = 0
    while i < len(raw):
        if i + 2 > len(raw) or i + 2 + raw[i + 1] > len(raw):
            raise ValueError("truncated TLV")
        tag, length = raw[i], raw[i + 1]
        fields.append((tag, raw[i + 2 : i + 2 + length].decode("utf-8")))
        i += 2 + length
    return fields


def document_fields(doc: Invoice | CreditNote) -> list[tuple[int, str]]:
    tax = doc.taxes[0]
    if (
        tax.tax_currency == "SAR"
        and tax.tax_currency_taxable_amount is not None
        and tax.tax_currency_amount is not None
    ):
        total = tax.tax_currency_taxable_amount + tax.tax_currency_amount
        vat = tax.tax_currency_amount
    else:
        total, vat = doc.total, doc.tax_total
    vat_number = (
        doc.seller.vat_id[2:]
        if doc.seller.vat_id and doc.seller.vat_id.startswith("SA")
        else doc.seller.tax_id
    )
    currency = "SAR" if tax.tax_currency == "SAR" else doc.currency
    return [
        (1, doc.seller.name),
        (2, vat_number),
        (3, f"{doc.issue_date.isoformat()}T00:00:00Z"),
        (4, fmt(round_money(total, currency))),
        (5, fmt(round_money(vat, currency))),
    ]


def document_qr(doc: Invoice | CreditNote) -> str:
    return tlv_base64(document_fields(doc))


def qr_png_data_uri(payload: str) -> str:
    return str(segno.make(payload, error="m", micro=False).png_data_uri(scale=3, border=2))
