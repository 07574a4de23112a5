from collections.abc import Callable
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from billing.errors import ConfigError, TaxHeld, TaxRuleMissing
from billing.fx import FxDateRule
from billing.parties import Buyer, Seller
from billing.tax import Mechanism, TaxRules, Treatment, parse
from billing.tax import load as load_rules

D2026 = date(2026, 3, 15)
# tax_rules.yaml: every country whose consumer rule wants the seller to charge VAT, where it is not
# registered (RU is: issuer.yaml), holds the sale (b2c_unregistered defaults to hold); PK's rule
# collects through the payer (b2c not_collecting)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "billing"


@pytest.fixture(scope="module")
def tax_rules() -> TaxRules:
    """Exactly as shipped (the other billing tests decide UAE consumers for themselves)."""
    return load_rules(CONFIGS / "tax_rules.yaml")


HELD = {"KZ", "TR", "UZ", "KG", "TJ", "BY", "IN", "SA", "AE", "EG"}
BUSINESS_IDS = {
    "KZ": "940140000385",
    "UZ": "302936161",
    "KG": "01234567890123",
    "TJ": "123456789",
    "RU": "7707083893",
    "BY": "200988541",
    "IN": "27AAPFU0939F1ZV",
    "PK": "1234567",
    "SA": "300000000000003",
    "AE": "100123456700003",
    "TR": "4540536920",
    "EG": "100531385",
}


@pytest.mark.parametrize(
    ("country", "treatment", "rate"),
    [
        ("KZ", Treatment.REVERSE_CHARGE, "16"),
        ("UZ", Treatment.TAX_AGENT, "12"),
        (
            "KG",
            Treatment.NOT_COLLECTING,
            "12",
        ),  # no reverse charge in KG and the seller is not registered there
        ("TJ", Treatment.TAX_AGENT, "14"),
        ("RU", Treatment.SUPPLIER_CHARGES, "22"),  # the sample seller is registered in RU
        ("BY", Treatment.TAX_AGENT, "20"),
        ("IN", Treatment.REVERSE_CHARGE, "18"),
        ("PK", Treatment.NOT_COLLECTING, None),  # provincial, not configured
        ("SA", Treatment.REVERSE_CHARGE, "15"),
        ("AE", Treatment.REVERSE_CHARGE, "5"),
        ("TR", Treatment.REVERSE_CHARGE, "20"),
        ("EG", Treatment.REVERSE_CHARGE, "14"),
    ],
)
def test_b2b_treatment_per_country(
    tax_rules: TaxRules,
    seller: Seller,
    make_buyer: Callable[..., Buyer],
    country: str,
    treatment: Treatment,
    rate: str | None,
) -> None:
    t = tax_rules.determine(make_buyer(country, BUSINESS_IDS[country]), seller, D2026)
    assert t.treatment is treatment
    assert t.rate == (None if rate is None else Decimal(rate))
    assert t.business is True
    assert t.charged_rate == (Decimal(rate) if treatment is Treatment.SUPPLIER_CHARGES and rate else 0)
    assert t.rule_id.startswith(country)
    assert t.text("en") and t.text("xx") == t.text("en")


@pytest.mark.parametrize("country", sorted(BUSINESS_IDS))
def test_b2c_without_registration_is_held_or_not_collecting(
    tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer], country: str
) -> None:
    if country in HELD:  # consumers cannot self-assess: held, never invoiced "not collecting"
        with pytest.raises(TaxHeld, match=f"consumer sales to {country} need the seller's VAT registration"):
            tax_rules.determine(make_buyer(country), seller, D2026)
        return
    t = tax_rules.determine(make_buyer(country), seller, D2026)
    expected = Treatment.SUPPLIER_CHARGES if country == "RU" else Treatment.NOT_COLLECTING
    assert t.treatment is expected
    assert t.business is False
    if expected is Treatment.NOT_COLLECTING:
        assert t.charged_rate == 0 and t.tax_currency is None and t.seller_vat_id is None
        assert "does not collect" in t.text("en")


@pytest.mark.parametrize(
    ("country", "before", "after", "day_before", "day_of"),
    [
        ("RU", "20", "22", date(2025, 12, 31), date(2026, 1, 1)),
        ("KZ", "12", "16", date(2025, 12, 31), date(2026, 1, 1)),
        ("TJ", "14", "13", date(2026, 12, 31), date(2027, 1, 1)),
        ("TR", "18", "20", date(2023, 7, 9), date(2023, 7, 10)),
        ("UZ", "15", "12", date(2022, 12, 31), date(2023, 1, 1)),
        ("SA", "5", "15", date(2020, 6, 30), date(2020, 7, 1)),
    ],
)
def test_rates_are_pinned_to_dates(
    tax_rules: TaxRules,
    seller: Seller,
    make_buyer: Callable[..., Buyer],
    country: str,
    before: str,
    after: str,
    day_before: date,
    day_of: date,
) -> None:
    who = make_buyer(country, BUSINESS_IDS[country])
    old, new = tax_rules.determine(who, seller, day_before), tax_rules.determine(who, seller, day_of)
    assert (old.rate, new.rate) == (Decimal(before), Decimal(after))
    assert old.rule_id != new.rule_id


def test_ru_rate_on_the_invoice_follows_the_rule(
    tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer]
) -> None:
    who = make_buyer("RU", "7707083893")
    assert tax_rules.determine(who, seller, date(2025, 12, 31)).charged_rate == Decimal("20")
    assert tax_rules.determine(who, seller, date(2026, 1, 1)).charged_rate == Decimal("22")
    t = tax_rules.determine(who, seller, date(2026, 1, 1))
    assert t.seller_vat_id == "RU9909000004" and t.seller_registered
    assert t.text("ru") == "НДС 22 % начислен поставщиком (RU)."


def test_unknown_country_is_not_collecting_never_zero_charged(
    tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer]
) -> None:
    for who in (make_buyer("BR", "12345678"), make_buyer("BR"), make_buyer("IR")):
        t = tax_rules.determine(who, seller, D2026)
        assert t.treatment is Treatment.NOT_COLLECTING
        assert t.rate is None and t.mechanism is None
        assert t.rule_id == f"none:{who.billing_country}"
        assert f"does not collect tax in {who.billing_country}" in t.text("en")


def test_business_without_tax_id_is_b2c(
    tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer]
) -> None:
    t = tax_rules.determine(make_buyer("PK", None, business=True), seller, D2026)
    assert t.treatment is Treatment.NOT_COLLECTING and t.business is False
    with pytest.raises(TaxHeld):  # a KZ "business" without a tax id is a consumer: held
        tax_rules.determine(make_buyer("KZ", None, business=True), seller, D2026)


def test_registration_switches_b2c_to_supplier_charges(
    tax_rules: TaxRules,
    seller: Seller,
    make_buyer: Callable[..., Buyer],
    with_registration: Callable[[Seller, str, str], Seller],
) -> None:
    sa_seller = with_registration(seller, "SA", "310000000000003")
    t = tax_rules.determine(make_buyer("SA"), sa_seller, D2026)
    assert t.treatment is Treatment.SUPPLIER_CHARGES and t.charged_rate == Decimal("15")
    assert t.tax_currency == "SAR" and t.fx_date_rule is FxDateRule.TAX_POINT
    assert t.seller_vat_id == "SA310000000000003"
    kg = tax_rules.determine(
        make_buyer("KG", BUSINESS_IDS["KG"]), with_registration(seller, "KG", "01234567890123"), D2026
    )
    assert kg.treatment is Treatment.SUPPLIER_CHARGES and kg.mechanism is Mechanism.SUPPLIER_CHARGES


def test_ru_b2b_falls_back_to_tax_agent_when_unregistered(
    tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer]
) -> None:
    from dataclasses import replace

    unregistered = replace(seller, vat_registrations=())
    t = tax_rules.determine(make_buyer("RU", "7707083893"), unregistered, D2026)
    assert t.treatment is Treatment.TAX_AGENT and t.charged_rate == 0 and t.rate == Decimal("22")


def test_domestic_sale_and_seller_ledger(
    tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer]
) -> None:
    cn = make_buyer("CN", "91110000600037341L", currency="CNY", language="zh")
    t = tax_rules.determine(cn, seller, D2026)
    assert (t.treatment, t.charged_rate, t.seller_vat_id) == (
        Treatment.SUPPLIER_CHARGES,
        Decimal("6"),
        "CN91120116MA05T8QX3G",
    )
    assert tax_rules.seller_ledger(cn, seller, D2026).treatment is Treatment.SUPPLIER_CHARGES
    export = tax_rules.seller_ledger(make_buyer("KZ", "940140000385"), seller, D2026)
    assert export.treatment is Treatment.ZERO_RATED_EXPORT
    assert export.fx_date_rule is FxDateRule.FIRST_OF_MONTH
    assert "零税率" in export.text("zh")
    assert tax_rules.seller_ledger(make_buyer("KZ"), seller, D2026).treatment is Treatment.NOT_COLLECTING
    with pytest.raises(TaxRuleMissing, match="seller ledger"):
        tax_rules.seller_ledger(make_buyer("KZ"), seller, date(2010, 1, 1))


def test_wording_is_localized(tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer]) -> None:
    t = tax_rules.determine(make_buyer("KZ", "940140000385", language="ru"), seller, D2026)
    assert t.text("ru") == "Обратное начисление: НДС (KZ, 16 %) исчисляет и уплачивает покупатель."
    assert t.text("en") == "Reverse charge: the customer accounts for the VAT (KZ, 16 %)."
    assert t.text("zh") == "反向征收：增值税由客户自行申报缴纳（KZ，16%）。"
    sa = tax_rules.determine(make_buyer("SA", "300000000000003"), seller, D2026)
    assert "SAR" in sa.text("en") and "احتساب عكسي" in sa.text("ar")


def test_gap_in_configured_rules_is_an_error(
    tax_rules: TaxRules, seller: Seller, make_buyer: Callable[..., Buyer]
) -> None:
    with pytest.raises(TaxRuleMissing, match=r"TJ.*2023-06-01"):
        tax_rules.determine(make_buyer("TJ", "123456789"), seller, date(2023, 6, 1))


def test_tax_point_policy(tax_rules: TaxRules) -> None:
    assert tax_rules.tax_point("KZ", period_end=date(2026, 1, 31), issue_date=date(2026, 2, 1)) == date(
        2026, 1, 31
    )
    eu = {"AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT"}
    eu |= {"LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK"}
    assert tuple(c for c in tax_rules.countries() if c not in eu) == (
        "AE",
        "BY",
        "CN",
        "EG",
        "IN",
        "KG",
        "KZ",
        "PK",
        "RU",
        "SA",
        "TJ",
        "TR",
        "UZ",
    )


def _rules(**country: Any) -> dict[str, Any]:
    return {
        "seller_country": "CN",
        "default_wording": {"reverse_charge": {"en": "RC"}},
        "seller_ledger": [
            {"id": "L", "effective_from": "2016-01-01", "b2b": "zero_rated_export", "b2c": "not_collecting"}
        ],
        "countries": {"XX": {"tax_point": "issue_date", **country}},
    }


def test_tax_rule_config_errors() -> None:
    rule = {
        "id": "r1",
        "effective_from": "2026-01-01",
        "rate": "10",
        "b2b": "reverse_charge",
        "b2c": "not_collecting",
    }
    parsed = parse(_rules(rules=[rule]))
    assert parsed.tax_point("XX", period_end=date(2026, 1, 31), issue_date=date(2026, 2, 1)) == date(
        2026, 2, 1
    )
    with pytest.raises(ConfigError, match=r"countries.XX.rules.r1: overlaps rule r2"):
        parse(_rules(rules=[rule, dict(rule, id="r2", effective_from="2026-06-01")]), file="t.yaml")
    with pytest.raises(ConfigError, match="rate: supplier_charges needs a rate"):
        parse(_rules(rules=[dict(rule, rate=None, b2c="supplier_charges")]), file="t.yaml")
    with pytest.raises(ConfigError, match="quoted string"):
        parse(_rules(rules=[dict(rule, rate=10.5)]), file="t.yaml")
    with pytest.raises(ConfigError, match=r"countries.XX.rules.0.b2b"):
        parse(_rules(rules=[dict(rule, b2b="self_assess")]), file="t.yaml")
    with pytest.raises(ConfigError, match="effective_to is before"):
        parse(_rules(rules=[dict(rule, effective_to="2025-01-01")]), file="t.yaml")
    with pytest.raises(ConfigError, match="tax_currency"):
        parse(_rules(rules=[rule], tax_currency="SARR"), file="t.yaml")
    bad_code = _rules(rules=[rule])
    bad_code["countries"] = {"kz": bad_code["countries"]["XX"]}
    with pytest.raises(ConfigError, match="ISO 3166"):
        parse(bad_code, file="t.yaml")


def test_eu_business_is_reverse_charged_under_article_196_and_consumers_need_the_oss(
    tax_rules: TaxRules,
    seller: Seller,
    make_buyer: Callable[..., Buyer],
    with_registration: Callable[[Seller, str, str], Seller],
) -> None:
    """Issue 13: EU buyers had no treatment at all (a German business got "not collecting")."""
    from billing.errors import TaxIdInvalid
    from billing.taxid import validate

    t = tax_rules.determine(make_buyer("DE", "DE136695976"), seller, D2026)
    assert (t.treatment, t.rate, t.business) == (Treatment.REVERSE_CHARGE, Decimal("19"), True)
    assert "Article 196, Council Directive 2006/112/EC" in t.text("en") and t.charged_rate == 0
    with pytest.raises(TaxIdInvalid, match="EU VAT number"):  # the checksum, not only the format
        validate("DE", "DE136695977")
    assert validate("GR", "EL094259216") == "094259216"
    with pytest.raises(TaxHeld, match=r"non-Union OSS"):  # a consumer: the seller must charge VAT
        tax_rules.determine(make_buyer("FR"), seller, D2026)
    oss = with_registration(seller, "EU", "EU372000041")  # one non-Union OSS registration, every state
    fr = tax_rules.determine(make_buyer("FR"), oss, D2026)
    assert (fr.treatment, fr.charged_rate) == (Treatment.SUPPLIER_CHARGES, Decimal("20"))
    assert fr.seller_vat_id == "EU372000041"  # the OSS number as registered, not FREU…
    bare = tax_rules.determine(make_buyer("DE"), with_registration(seller, "EU", "372000041"), D2026)
    assert bare.seller_vat_id == "EU372000041"
    ro = tax_rules.determine(make_buyer("RO"), oss, date(2025, 12, 31))
    assert ro.charged_rate == Decimal("21")  # RO 19 -> 21 % from 2025-08-01
