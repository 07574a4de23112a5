"""UBL 2.1 Invoice and CreditNote (EN 16931 core, ``urn:cen.eu:en16931:2017``) written with lxml.

VAT categories by treatment: ``reverse_charge`` and ``tax_agent`` -> AE (VATEX-EU-AE; the buyer
accounts for the tax), ``supplier_charges`` -> S, ``not_collecting`` / ``out_of_scope`` -> O
(VATEX-EU-O: no seller or buyer VAT id may appear, BR-O-02), ``zero_rated_export`` -> Z.
Seller ids: BT-30 legal registration (USCC), BT-32 tax registration (``TaxScheme/ID = TAX``), BT-31
the seller's VAT registration in the buyer's jurisdiction when it has one; the buyer VAT id (BT-48)
carries its ISO 3166 prefix (BR-CO-09). When the tax currency differs (SA: SAR) the document has
``TaxCurrencyCode``, a ``TaxExchangeRate`` with the recorded rate and a second ``TaxTotal`` (BT-111).
Token lines: quantity in tokens (unit C62), price per 1 000 000 tokens (``BaseQuantity``).
"""

from __future__ import annotations

from decimal import Decimal

from lxml import etree

from billing.documents import (
    AppliedTax,
    CreditNote,
    DocumentStatus,
    FxUse,
    Invoice,
    InvoiceLine,
    LineKind,
    tax_of,
)
from billing.errors import DocumentStateError
from billing.money import fmt
from billing.price_book import PER
from billing.taxid import with_prefix

NS_INVOICE = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
NS_CREDIT_NOTE = "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"
CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
CBC = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
CUSTOMIZATION_ID = "urn:cen.eu:en16931:2017"

_CATEGORY = {
    "reverse_charge": ("AE", "VATEX-EU-AE"),
    "tax_agent": ("AE", "VATEX-EU-AE"),
    "supplier_charges": ("S", None),
    "not_collecting": ("O", "VATEX-EU-O"),
    "out_of_scope": ("O", "VATEX-EU-O"),
    "zero_rated_export": ("Z", None),
}


def category(tax: AppliedTax) -> tuple[str, str | None]:
    """(UNCL 5305 VAT category, VATEX exemption reason code) for an applied tax."""
    return _CATEGORY[tax.treatment]


def _el(parent: etree._Element, ns: str, name: str, text: str | None = None, **attrs: str) -> etree._Element:
    node = etree.SubElement(parent, f"{{{ns}}}{name}", attrs)
    if text is not None:
        node.text = text
    return node


def _cbc(parent: etree._Element, name: str, text: str, **attrs: str) -> etree._Element:
    return _el(parent, CBC, name, text, **attrs)


def _cac(parent: etree._Element, name: str) -> etree._Element:
    return _el(parent, CAC, name)


def _amount(parent: etree._Element, name: str, value: Decimal, currency: str) -> None:
    _cbc(parent, name, fmt(value), currencyID=currency)


def _tax_scheme(parent: etree._Element, company_id: str, scheme: str) -> None:
    pts = _cac(parent, "PartyTaxScheme")
    _cbc(pts, "CompanyID", company_id)
    _cbc(_cac(pts, "TaxScheme"), "ID", scheme)


def _seller(root: etree._Element, doc: Invoice | CreditNote, cat: str) -> None:
    s = doc.seller
    party = _cac(_cac(root, "AccountingSupplierParty"), "Party")
    _cbc(_cac(party, "PartyName"), "Name", s.name)
    address = _cac(party, "PostalAddress")
    if s.address_lines:
        _cbc(address, "StreetName", s.address_lines[0])
    _cbc(address, "CityName", s.city)
    _cbc(address, "PostalZone", s.postal_code)
    _cbc(_cac(address, "Country"), "IdentificationCode", s.country)
    if s.vat_id and cat != "O":
        _tax_scheme(party, s.vat_id, "VAT")
    _tax_scheme(party, s.tax_id, "TAX")
    legal = _cac(party, "PartyLegalEntity")
    _cbc(legal, "RegistrationName", s.name)
    _cbc(legal, "CompanyID", s.tax_id)
    _cbc(_cac(party, "Contact"), "ElectronicMail", s.email)


def _buyer(root: etree._Element, doc: Invoice | CreditNote, cat: str) -> None:
    b = doc.buyer
    party = _cac(_cac(root, "AccountingCustomerParty"), "Party")
    _cbc(_cac(party, "PartyIdentification"), "ID", b.id)
    _cbc(_cac(_cac(party, "PostalAddress"), "Country"), "IdentificationCode", b.billing_country)
    if b.tax_id and cat != "O":
        _tax_scheme(party, with_prefix(b.billing_country, b.tax_id), "VAT")
    _cbc(_cac(party, "PartyLegalEntity"), "RegistrationName", b.name)


def _tax_category(parent: etree._Element, name: str, tax: AppliedTax, with_reason: bool) -> None:
    cat, code = category(tax)
    node = _cac(parent, name)
    _cbc(node, "ID", cat)
    if cat != "O":
        _cbc(node, "Percent", fmt(tax.rate))
    if with_reason and code is not None:
        _cbc(node, "TaxExemptionReasonCode", code)
        _cbc(node, "TaxExemptionReason", tax.note)
    _cbc(_cac(node, "TaxScheme"), "ID", "VAT")


def _tax_totals(root: etree._Element, doc: Invoice | CreditNote) -> None:
    total = _cac(root, "TaxTotal")
    _amount(total, "TaxAmount", doc.tax_total, doc.currency)
    for tax in doc.taxes:
        sub = _cac(total, "TaxSubtotal")
        _amount(sub, "TaxableAmount", tax.taxable_amount, doc.currency)
        _amount(sub, "TaxAmount", tax.amount, doc.currency)
        _tax_category(sub, "TaxCategory", tax, with_reason=True)
    local = doc.taxes[0]
    if local.tax_currency and local.tax_currency_amount is not None:
        _amount(_cac(root, "TaxTotal"), "TaxAmount", local.tax_currency_amount, local.tax_currency)


def _exchange_rate(root: etree._Element, fx: FxUse) -> None:
    node = _cac(root, "TaxExchangeRate")
    _cbc(node, "SourceCurrencyCode", fx.from_currency)
    _cbc(node, "TargetCurrencyCode", fx.to_currency)
    _cbc(node, "CalculationRate", fmt(fx.rate))
    _cbc(node, "MathematicOperatorCode", "multiply")
    _cbc(node, "Date", fx.date.isoformat())


def _line(
    root: etree._Element, index: int, line: InvoiceLine, doc: Invoice | CreditNote, credit: bool
) -> None:
    node = _cac(root, "CreditNoteLine" if credit else "InvoiceLine")
    _cbc(node, "ID", str(index))
    if line.kind is LineKind.MINIMUM_COMMITMENT:
        quantity, price, base, name = "1", line.amount, None, "Minimum commitment top-up"
        description = "Top-up to the contract's minimum monthly commitment"
    else:
        assert line.unit_price_per_million is not None and line.token_type is not None
        quantity, price, base = str(line.quantity_tokens), line.unit_price_per_million, str(PER)
        name = f"{line.model} {line.token_type.value.replace('_', ' ')} tokens"
        tier = f"; tier {line.tier} ({line.tier_mode})" if line.tier else ""
        late = "; late usage of an earlier period" if line.adjustment else ""
        batch = "; Batch API usage at the batch discount" if line.kind is LineKind.BATCH_USAGE else ""
        tariff = ""
        unit = "tokens" if not line.unit else f"{line.unit.replace('_', ' ')}s"
        if line.unit:  # a tariff other than tokens: what the billed units are (billing/tariffs.py)
            factor = "" if line.factor is None else f" / premium {format(line.factor, 'f')}"
            tariff = f"; {line.language}: {line.raw_tokens} raw tokens{factor} = billed {unit}"
        description = f"Price per 1,000,000 {unit}{tier}{late}{batch}{tariff}"
    _cbc(node, "CreditedQuantity" if credit else "InvoicedQuantity", quantity, unitCode="C62")
    _amount(node, "LineExtensionAmount", line.amount, doc.currency)
    item = _cac(node, "Item")
    _cbc(item, "Description", description)
    _cbc(item, "Name", name)
    if line.model:
        _cbc(
            _cac(item, "SellersItemIdentification"),
            "ID",
            f"{line.model}:{line.token_type.value if line.token_type else ''}",
        )
    _tax_category(item, "ClassifiedTaxCategory", tax_of(doc, line), with_reason=False)
    price_node = _cac(node, "Price")
    _amount(price_node, "PriceAmount", price, doc.currency)
    if base is not None:
        _cbc(price_node, "BaseQuantity", base, unitCode="C62")


def to_ubl(doc: Invoice | CreditNote) -> bytes:
    """UBL 2.1 XML (UTF-8) of a finalized invoice or credit note."""
    if doc.status is not DocumentStatus.FINALIZED or doc.number is None:
        raise DocumentStateError("UBL is written for finalized documents only (they need a number)")
    credit = isinstance(doc, CreditNote)
    root = etree.Element(
        f"{{{NS_CREDIT_NOTE if credit else NS_INVOICE}}}{'CreditNote' if credit else 'Invoice'}",
        nsmap={None: NS_CREDIT_NOTE if credit else NS_INVOICE, "cac": CAC, "cbc": CBC},
    )
    cat, _ = category(doc.taxes[0])
    _cbc(root, "CustomizationID", CUSTOMIZATION_ID)
    _cbc(root, "ID", doc.number)
    _cbc(root, "IssueDate", doc.issue_date.isoformat())
    if isinstance(doc, Invoice):
        _cbc(root, "DueDate", doc.due_date.isoformat())
        _cbc(root, "InvoiceTypeCode", "380")
    else:
        _cbc(root, "CreditNoteTypeCode", "381")
        _cbc(root, "Note", f"Credit note for {doc.original_number}: {doc.reason}")
    for tax in doc.taxes:
        _cbc(root, "Note", tax.note)
    if isinstance(doc, Invoice) and doc.withholding is not None:
        w = doc.withholding
        _cbc(
            root,
            "Note",
            f"Withholding tax: the buyer withholds {fmt(w.rate)} % ({fmt(w.amount)} {doc.currency})"
            f" under the law of {w.country}; a payment of {fmt(w.net)} {doc.currency} with the"
            f" certificate settles it. {w.source}",
        )
    _cbc(root, "DocumentCurrencyCode", doc.currency)
    tax_fx = next((f for f in doc.fx if f.purpose == "tax_currency"), None)
    if tax_fx is not None:
        _cbc(root, "TaxCurrencyCode", tax_fx.to_currency)
    _cbc(root, "BuyerReference", doc.buyer.id)
    period = _cac(root, "InvoicePeriod")
    _cbc(period, "StartDate", doc.period_start.isoformat())
    _cbc(period, "EndDate", doc.period_end.isoformat())
    if isinstance(doc, CreditNote):
        ref = _cac(_cac(root, "BillingReference"), "InvoiceDocumentReference")
        _cbc(ref, "ID", doc.original_number)
        _cbc(ref, "IssueDate", doc.original_issue_date.isoformat())
    # BT-122 supporting document: the digest of the ledger events billed (what a tenant recomputes)
    usage = _cac(root, "AdditionalDocumentReference")
    _cbc(usage, "ID", doc.usage_digest)
    _cbc(usage, "DocumentDescription", _usage_description(doc))
    _seller(root, doc, cat)
    _buyer(root, doc, cat)
    if isinstance(doc, Invoice):
        means = _cac(root, "PaymentMeans")
        _cbc(means, "PaymentMeansCode", "30")
        _cbc(means, "PaymentID", doc.number)
        account = _cac(means, "PayeeFinancialAccount")
        _cbc(account, "ID", doc.seller.bank["account_number"].replace(" ", ""))
        _cbc(account, "Name", doc.seller.bank["account_name"])
        _cbc(_cac(account, "FinancialInstitutionBranch"), "ID", doc.seller.bank["swift"])
    if tax_fx is not None:
        _exchange_rate(root, tax_fx)
    _tax_totals(root, doc)
    totals = _cac(root, "LegalMonetaryTotal")
    _amount(totals, "LineExtensionAmount", doc.subtotal, doc.currency)
    _amount(totals, "TaxExclusiveAmount", doc.subtotal, doc.currency)
    _amount(totals, "TaxInclusiveAmount", doc.total, doc.currency)
    prepaid = doc.prepaid_total if isinstance(doc, Invoice) else Decimal(0)
    if prepaid:  # BT-113 paid amount (prepaid credit applied), BT-115 amount due
        _amount(totals, "PrepaidAmount", prepaid, doc.currency)
    _amount(totals, "PayableAmount", doc.total - prepaid, doc.currency)
    for index, line in enumerate(doc.lines, 1):
        _line(root, index, line, doc, credit)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


def _usage_description(doc: Invoice | CreditNote) -> str:
    runs = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in doc.billed_events)
    events = f"; ledger events tenant_seq {runs}" if runs else ""
    return f"usage digest: sha256 over the sorted hashes of the ledger events billed{events}"
