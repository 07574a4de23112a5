from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Any

import facturx
import pytest
from lxml import etree

from billing.documents import CreditNote, Invoice
from billing.engine import UsageQuantity, build_credit_note, finalize
from billing.errors import DocumentStateError
from billing.parties import Buyer, Seller
from billing.render.ubl import CAC, CBC, to_ubl
from metering.events import TokenType

NS = {"cac": CAC, "cbc": CBC}
Q = "qwen2.5-7b-instruct"
S = "smollm2-135m-instruct"
USAGE = [
    UsageQuantity(Q, TokenType.INPUT, 150_000_000),
    UsageQuantity(Q, TokenType.OUTPUT, 60_000_000),
    UsageQuantity(S, TokenType.CACHED_INPUT, 1_234_567),
]


@pytest.fixture()
def documents(
    january: Callable[..., Invoice],
    seller: Seller,
    make_buyer: Callable[..., Buyer],
    with_registration: Callable[[Seller, str, str], Seller],
) -> dict[str, Invoice]:
    sa_seller = with_registration(seller, "SA", "310000000000003")
    cases: dict[str, Invoice] = {
        "sa_b2b_reverse_charge": january(USAGE, make_buyer("SA", "300000000000003", language="ar")),
        "sa_b2c_supplier_charges": january(USAGE, make_buyer("SA", language="ar"), seller=sa_seller),
        "ru_b2b_supplier_charges": january(USAGE, make_buyer("RU", "7707083893", language="ru")),
        "ae_b2c_not_collecting": january(USAGE, make_buyer("AE", language="ar")),
        "uz_b2b_tax_agent_minimum": january(
            USAGE[2:], make_buyer("UZ", "302936161", tenant="t-sample-enterprise")
        ),
        "kz_adjustment_negative": january(
            USAGE,
            make_buyer("KZ", "940140000385"),
            adjustments=[
                UsageQuantity(Q, TokenType.OUTPUT, -1_000_000),
                UsageQuantity(S, TokenType.INPUT, 5_000_000),
            ],
        ),
        "cn_domestic_cny": january(
            USAGE, make_buyer("CN", "91110000600037341L", currency="CNY", language="zh")
        ),
        "br_unknown_country": january(USAGE, make_buyer("BR", "12345678000195")),
    }
    return {k: finalize(v, f"TP-INV-2026-{i:06d}") for i, (k, v) in enumerate(cases.items(), 1)}


def _credit(invoice: Invoice) -> CreditNote:
    return finalize(
        build_credit_note(invoice, reason="Usage disputed", issue_date=date(2026, 2, 10)),
        "TP-CRN-2026-000001",
    )


def test_every_case_passes_xsd_and_en16931_schematron(documents: dict[str, Invoice], schematron: Any) -> None:
    for name, invoice in documents.items():
        xml = to_ubl(invoice)
        assert facturx.xml_check_xsd(xml, flavor="ubl-2.1-invoice") is True, name
        assert schematron.failures(xml) == [], name
        note = to_ubl(_credit(invoice))
        assert facturx.xml_check_xsd(note, flavor="ubl-2.1-creditnote") is True, name
        assert schematron.failures(note) == [], name


def test_schematron_check_can_fail(documents: dict[str, Invoice], schematron: Any) -> None:
    """The validator really validates: a broken total is reported as a fatal BR-CO-15."""
    root = etree.fromstring(to_ubl(documents["ru_b2b_supplier_charges"]))
    root.find("cac:LegalMonetaryTotal/cbc:TaxInclusiveAmount", NS).text = "1.00"
    failures = schematron.failures(etree.tostring(root))
    assert any(rule == "BR-CO-15" for _, rule, _ in failures), failures


def _x(xml: bytes) -> Callable[[str], list[str]]:
    root = etree.fromstring(xml)
    return lambda path: [n if isinstance(n, str) else (n.text or "") for n in root.xpath(path, namespaces=NS)]


def test_reverse_charge_sa_with_sar_tax_currency(documents: dict[str, Invoice]) -> None:
    x = _x(to_ubl(documents["sa_b2b_reverse_charge"]))
    assert x("/*/cbc:CustomizationID") == ["urn:cen.eu:en16931:2017"]
    assert x("/*/cbc:InvoiceTypeCode") == ["380"]
    assert x("/*/cbc:DocumentCurrencyCode") == ["USD"] and x("/*/cbc:TaxCurrencyCode") == ["SAR"]
    assert x("//cac:InvoicePeriod/cbc:StartDate") == ["2026-01-01"]
    assert x(
        "//cac:AccountingSupplierParty//cac:PartyTaxScheme[cac:TaxScheme/cbc:ID='TAX']/cbc:CompanyID"
    ) == ["91120116MA05T8QX3G"]  # BT-32
    assert x("//cac:AccountingSupplierParty//cac:PartyTaxScheme[cac:TaxScheme/cbc:ID='VAT']") == []
    assert x("//cac:AccountingCustomerParty//cac:PartyTaxScheme/cbc:CompanyID") == ["SA300000000000003"]
    assert x("/*/cac:TaxTotal[1]/cac:TaxSubtotal/cac:TaxCategory/cbc:ID") == ["AE"]
    assert x("//cac:TaxSubtotal/cac:TaxCategory/cbc:TaxExemptionReasonCode") == ["VATEX-EU-AE"]
    # subtotal 42.00 + 48.00 + 0.01 = 90.01 USD; SAR 90.01 x 3.75 = 337.5375 -> tax 0
    assert x("/*/cac:TaxTotal/cbc:TaxAmount/@currencyID") == ["USD", "SAR"]
    assert x("/*/cac:TaxTotal/cbc:TaxAmount") == ["0.00", "0.00"]
    assert x("//cac:TaxExchangeRate/cbc:CalculationRate") == ["3.7500"]
    assert x("//cac:LegalMonetaryTotal/cbc:PayableAmount") == ["90.01"]
    assert x("//cac:InvoiceLine/cbc:InvoicedQuantity/@unitCode") == ["C62"] * 4
    assert x("//cac:InvoiceLine/cac:Price/cbc:BaseQuantity") == ["1000000"] * 4


def test_supplier_charges_sa_states_vat_in_sar(documents: dict[str, Invoice]) -> None:
    x = _x(to_ubl(documents["sa_b2c_supplier_charges"]))
    assert x("/*/cac:TaxTotal[1]//cac:TaxCategory/cbc:ID") == ["S"]
    assert x("/*/cac:TaxTotal[1]//cac:TaxCategory/cbc:Percent") == ["15"]
    # 90.01 x 15 % = 13.5015 -> 13.50 USD; SAR: 90.01 x 3.75 x 15 % = 50.630625 -> 50.63
    assert x("/*/cac:TaxTotal/cbc:TaxAmount") == ["13.50", "50.63"]
    assert x(
        "//cac:AccountingSupplierParty//cac:PartyTaxScheme[cac:TaxScheme/cbc:ID='VAT']/cbc:CompanyID"
    ) == ["SA310000000000003"]  # BT-31 in the buyer's jurisdiction


def test_not_collecting_uses_category_o_without_vat_ids(documents: dict[str, Invoice]) -> None:
    for case in ("ae_b2c_not_collecting", "br_unknown_country"):
        x = _x(to_ubl(documents[case]))
        assert set(x("//cac:TaxCategory/cbc:ID | //cac:ClassifiedTaxCategory/cbc:ID")) == {"O"}
        assert x("//cac:TaxCategory/cbc:Percent") == []
        assert x("//cac:PartyTaxScheme[cac:TaxScheme/cbc:ID='VAT']") == []
        assert x("//cac:TaxSubtotal/cac:TaxCategory/cbc:TaxExemptionReasonCode") == ["VATEX-EU-O"]


def test_tax_agent_minimum_commitment_and_adjustment_lines(documents: dict[str, Invoice]) -> None:
    x = _x(to_ubl(documents["uz_b2b_tax_agent_minimum"]))
    assert x("//cac:TaxSubtotal/cac:TaxCategory/cbc:ID") == ["AE"]
    assert x("//cac:InvoiceLine/cac:Item/cbc:Name")[-1] == "Minimum commitment top-up"
    assert x("//cac:LegalMonetaryTotal/cbc:PayableAmount") == ["500.00"]
    y = _x(to_ubl(documents["kz_adjustment_negative"]))
    assert "-1000000" in y("//cac:InvoiceLine/cbc:InvoicedQuantity")
    assert all(Decimal(p) >= 0 for p in y("//cac:Price/cbc:PriceAmount"))  # BR-27


def test_credit_note_references_the_invoice(documents: dict[str, Invoice]) -> None:
    invoice = documents["ru_b2b_supplier_charges"]
    x = _x(to_ubl(_credit(invoice)))
    assert x("/*/cbc:CreditNoteTypeCode") == ["381"]
    assert x("//cac:BillingReference/cac:InvoiceDocumentReference/cbc:ID") == [invoice.number]
    assert x("//cac:BillingReference/cac:InvoiceDocumentReference/cbc:IssueDate") == ["2026-02-01"]
    assert x("//cac:CreditNoteLine/cbc:CreditedQuantity")[0] == "100000000"
    assert x("//cac:LegalMonetaryTotal/cbc:PayableAmount") == [str(invoice.total)]


def test_drafts_have_no_ubl(january: Callable[..., Invoice], make_buyer: Callable[..., Buyer]) -> None:
    with pytest.raises(DocumentStateError, match="finalized"):
        to_ubl(january(USAGE, make_buyer("KZ", "940140000385")))
