"""HTML invoice / credit note in the buyer's language (Jinja2 template shipped as package data).

Right-to-left languages (ar) get ``dir="rtl"``, and every piece of data inside (numbers, IBANs, tax
ids, document numbers, Latin names) is a bidi isolate with its own direction, so an account number's
digit groups never reorder. Labels come from templates/messages.yaml, tax wording from the document
(or templates/tax_wording.yaml), numbers, dates and currencies from Babel for the buyer's locale; a
Saudi buyer's document carries the ZATCA phase-1 QR code. A void document (status void, or a
``void_reference`` given) carries a VOID mark and the cancelling credit note's number, and no
payment instructions. The CSS font stack ('Noto Sans', 'Noto Sans CJK SC', 'Noto Sans Arabic')
covers Latin, Cyrillic (incl. Kazakh), CJK and Arabic when rendered to PDF by WeasyPrint.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from billing.documents import AppliedTax, CreditNote, DocumentStatus, Invoice, InvoiceLine, LineKind
from billing.render.bidi import fill, isolate, ltr
from billing.render.i18n import Localizer
from billing.render.zatca import document_qr, qr_png_data_uri
from billing.tariffs import UNIT_CHARACTER, UNIT_EE_TOKEN


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("billing.render", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["iso"] = isolate
    env.filters["ltr"] = ltr
    return env


def line_label(line: InvoiceLine, loc: Localizer) -> str:
    """The description of a line without its model name."""
    if line.kind is LineKind.MINIMUM_COMMITMENT:
        return loc.t("minimum_commitment")
    assert line.token_type is not None
    parts = [loc.t(line.token_type.value)]
    if line.tier is not None:
        parts.append(f"{loc.t('tier')} {line.tier} ({loc.t(line.tier_mode or '')})")
    if line.adjustment:
        parts.append(loc.t("adjustment"))
    if line.kind is LineKind.BATCH_USAGE:
        parts.append(loc.t("batch"))
    if line.unit:  # a tariff other than tokens: the language, its raw tokens and the factor
        parts.append(tariff_label(line, loc))
    return "; ".join(parts)


def tariff_label(line: InvoiceLine, loc: Localizer) -> str:
    raw = loc.number(line.raw_tokens or 0)
    language = line.language or "und"
    if line.unit == UNIT_EE_TOKEN:
        if line.factor is None:
            return loc.t("ee_no_factor", language=language, raw=raw)
        return loc.t("ee_tokens", language=language, raw=raw, factor=format(line.factor, "f"))
    if line.unit == UNIT_CHARACTER:
        return loc.t("per_character", language=language, raw=raw)
    return loc.t("no_text_size", language=language)


def line_description(line: InvoiceLine, loc: Localizer) -> str:
    label = line_label(line, loc)
    if line.kind is LineKind.MINIMUM_COMMITMENT or line.model is None:
        return label
    return f"{line.model} — {label}"


def void_notice(loc: Localizer, reference: str | None) -> Markup:
    """The VOID notice: names the cancelling credit note (as an isolate) when known."""
    if reference is None:
        return escape(loc.t("voided"))
    return fill(loc.t("voided_by"), reference=reference)


def is_void(doc: Invoice | CreditNote, void_reference: str | None) -> bool:
    return void_reference is not None or doc.status is DocumentStatus.VOID


def to_html(
    doc: Invoice | CreditNote, *, language: str | None = None, void_reference: str | None = None
) -> str:
    """The document as a standalone HTML page in ``language`` (default: the buyer's).

    ``void_reference``: the number of the credit note that cancelled the document; given (or the
    document's status void), the page carries a VOID mark and no payment instructions.
    """
    loc = Localizer.for_language(language or doc.buyer.language)
    qr = None
    if doc.buyer.billing_country == "SA":
        payload = document_qr(doc)
        qr = {"payload": payload, "image": qr_png_data_uri(payload)}

    def tax_text(tax: AppliedTax) -> str:
        rate = tax.statutory_rate if tax.statutory_rate is not None else tax.rate
        return loc.tax_text(
            tax.treatment, tax.wording, tax.note, country=doc.buyer.billing_country, rate=rate
        )

    return (
        _environment()
        .get_template("invoice.html")
        .render(
            doc=doc,
            loc=loc,
            t=loc.t,
            credit=isinstance(doc, CreditNote),
            draft=doc.status is DocumentStatus.DRAFT,
            void=is_void(doc, void_reference),
            void_notice=void_notice(loc, void_reference),
            label=lambda line: line_label(line, loc),
            tax_text=tax_text,
            fill=lambda key, **values: fill(loc.t(key), **values),  # values isolated (LTR in RTL)
            qr=qr,
        )
    )
