"""Tax rules as effective-dated data -> TaxTreatment (rate, mechanism, wording). Not tax advice.

``configs/billing/tax_rules.yaml`` holds, per buyer country, rules with ``effective_from`` /
``effective_to`` (inclusive), the statutory ``rate``, the ``b2b`` and ``b2c`` mechanisms
(``reverse_charge`` | ``tax_agent`` | ``supplier_charges`` | ``not_collecting``), the tax currency
and FX date rule, and invoice wording (English plus local languages) per treatment.

Determination (``TaxRules.determine(buyer, seller, supply_date)``):

1. buyer in the seller's own country -> that country's domestic rule, seller registered;
2. country without rules -> ``not_collecting`` (explicit, with wording; never a silent 0 %);
3. the rule in force on the supply date (none -> TaxRuleMissing);
4. B2B when the buyer is a business **with** a tax id, else B2C;
5. ``supplier_charges`` needs the seller's registration in that country (``Seller.vat_registrations``
   in issuer.yaml, the single source of truth); unregistered -> the rule's ``b2b_if_unregistered``
   (e.g. RU: buyer acts as tax agent) or ``not_collecting``.

``TaxRules.seller_ledger(...)`` gives the seller's own-books view (CN: export of services
zero-rated under Caishui [2016] No. 36 Annex 4 for overseas entities).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.config_io import decimal_text, read_yaml, validate
from billing.errors import ConfigError, TaxHeld, TaxRuleMissing
from billing.fx import FxDateRule
from billing.money import check_currency, to_decimal
from billing.parties import Buyer, Seller
from billing.taxid import EU_MEMBER_STATES, with_prefix


class Treatment(enum.StrEnum):
    REVERSE_CHARGE = "reverse_charge"
    SUPPLIER_CHARGES = "supplier_charges"
    TAX_AGENT = "tax_agent"
    NOT_COLLECTING = "not_collecting"
    ZERO_RATED_EXPORT = "zero_rated_export"
    OUT_OF_SCOPE = "out_of_scope"


class Mechanism(enum.StrEnum):
    REVERSE_CHARGE = "reverse_charge"
    TAX_AGENT = "tax_agent"
    SUPPLIER_CHARGES = "supplier_charges"
    NOT_COLLECTING = "not_collecting"


class TaxPoint(enum.StrEnum):
    PERIOD_END = "period_end"
    ISSUE_DATE = "issue_date"


@dataclass(frozen=True, slots=True)
class TaxTreatment:
    treatment: Treatment
    rate: Decimal | None  # statutory rate of the jurisdiction (None: unknown / not configured)
    mechanism: Mechanism | None
    wording: Mapping[str, str]  # language -> text
    rule_id: str
    tax_currency: str | None  # currency the tax must (also) be stated in, None = invoice currency
    fx_date_rule: FxDateRule
    country: str
    business: bool
    seller_registered: bool
    seller_vat_id: str | None  # the seller's registration shown for this jurisdiction (ISO-prefixed)

    @property
    def charged_rate(self) -> Decimal:
        """The rate the seller charges on the invoice (0 unless supplier_charges)."""
        if self.treatment is Treatment.SUPPLIER_CHARGES and self.rate is not None:
            return self.rate
        return Decimal(0)

    def text(self, language: str) -> str:
        return self.wording.get(language) or self.wording.get("en", "")


Wording = Mapping[Treatment, Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class TaxRule:
    id: str
    effective_from: date
    effective_to: date | None
    rate: Decimal | None
    b2b: Mechanism
    b2c: Mechanism
    b2b_if_unregistered: Mechanism
    wording: Wording
    note: str


class B2cUnregistered(enum.StrEnum):
    """A consumer sale where the rule wants the seller to charge VAT and it is not registered there."""

    HOLD = "hold"  # not invoiced: the run reports it, the usage waits for a registration
    NOT_COLLECTING = "not_collecting"  # invoiced without VAT (the old behaviour; opt in per country)


@dataclass(frozen=True, slots=True)
class CountryTax:
    tax_point: TaxPoint
    tax_currency: str | None
    fx_date_rule: FxDateRule
    rules: tuple[TaxRule, ...]
    b2c_unregistered: B2cUnregistered = B2cUnregistered.HOLD


@dataclass(frozen=True, slots=True)
class LedgerRule:
    id: str
    effective_from: date
    effective_to: date | None
    b2b: Treatment
    b2c: Treatment
    fx_date_rule: FxDateRule
    wording: Wording
    note: str


def _freeze(wording: dict[Treatment, dict[str, str]]) -> Wording:
    return MappingProxyType({t: MappingProxyType(dict(texts)) for t, texts in wording.items()})


def _rate(value: Any) -> Decimal | None:
    return None if value is None else to_decimal(decimal_text(value))


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    effective_from: date
    effective_to: date | None = None
    rate: Decimal | None
    b2b: Mechanism
    b2c: Mechanism
    b2b_if_unregistered: Mechanism = Mechanism.NOT_COLLECTING
    wording: dict[Treatment, dict[str, str]] = Field(default_factory=dict)
    note: str = ""

    @field_validator("rate", mode="before")
    @classmethod
    def _exact(cls, value: Any) -> Decimal | None:
        return _rate(value)


class _Country(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tax_point: TaxPoint = TaxPoint.PERIOD_END
    tax_currency: str | None = None
    fx_date_rule: FxDateRule = FxDateRule.TAX_POINT
    rules: list[_Rule] = Field(min_length=1)
    b2c_unregistered: B2cUnregistered = B2cUnregistered.HOLD

    @field_validator("tax_currency")
    @classmethod
    def _ccy(cls, value: str | None) -> str | None:
        return None if value is None else check_currency(value)


class _LedgerRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    effective_from: date
    effective_to: date | None = None
    b2b: Treatment
    b2c: Treatment
    fx_date_rule: FxDateRule = FxDateRule.FIRST_OF_MONTH
    wording: dict[Treatment, dict[str, str]] = Field(default_factory=dict)
    note: str = ""


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seller_country: str = Field(pattern=r"^[A-Z]{2}$")
    ledger_currency: str = "CNY"
    default_wording: dict[Treatment, dict[str, str]]
    seller_ledger: list[_LedgerRule] = Field(min_length=1)
    countries: dict[str, _Country]


def _in_force(rules: tuple[Any, ...], on: date) -> Any:
    return next(
        (r for r in rules if r.effective_from <= on and (r.effective_to is None or on <= r.effective_to)),
        None,
    )


@dataclass(frozen=True, slots=True)
class TaxRules:
    """Loaded, validated tax rules (build with ``load`` or ``parse``)."""

    seller_country: str
    ledger_currency: str
    default_wording: Wording
    seller_ledger_rules: tuple[LedgerRule, ...]
    by_country: Mapping[str, CountryTax]

    def countries(self) -> tuple[str, ...]:
        return tuple(sorted(self.by_country))

    def tax_point(self, country: str, *, period_end: date, issue_date: date) -> date:
        """The supply date that picks the rule and the FX date (country's tax_point policy)."""
        cfg = self.by_country.get(country)
        return issue_date if cfg is not None and cfg.tax_point is TaxPoint.ISSUE_DATE else period_end

    def _wording(self, treatment: Treatment, overrides: Wording, **values: str) -> Mapping[str, str]:
        texts = {**self.default_wording.get(treatment, {}), **overrides.get(treatment, {})}
        return MappingProxyType({lang: text.format(**values) for lang, text in texts.items()})

    def determine(self, buyer: Buyer, seller: Seller, supply_date: date) -> TaxTreatment:
        country = buyer.billing_country.upper()
        business = buyer.business and bool(buyer.tax_id)
        cfg = self.by_country.get(country)
        if cfg is None:
            return TaxTreatment(
                Treatment.NOT_COLLECTING,
                None,
                None,
                self._wording(Treatment.NOT_COLLECTING, MappingProxyType({}), country=country, rate="-"),
                f"none:{country}",
                None,
                FxDateRule.TAX_POINT,
                country,
                business,
                False,
                None,
            )
        rule: TaxRule | None = _in_force(cfg.rules, supply_date)
        if rule is None:
            raise TaxRuleMissing(
                f"no tax rule for {country} in force on {supply_date.isoformat()}"
                f" (configured: {[r.id for r in cfg.rules]})"
            )
        domestic = country == seller.country
        registration = None if domestic else seller.registration_in(country, supply_date)
        if (
            registration is None and country in EU_MEMBER_STATES
        ):  # the non-Union OSS covers every member state
            registration = seller.registration_in("EU", supply_date)
        registered = domestic or registration is not None
        mechanism = rule.b2b if business else rule.b2c
        if mechanism is Mechanism.SUPPLIER_CHARGES and not registered:
            if not business and cfg.b2c_unregistered is B2cUnregistered.HOLD:
                where = (
                    "the non-Union OSS (vat_registrations: EU)" if country in EU_MEMBER_STATES else country
                )
                raise TaxHeld(
                    f"held: consumer sales to {country} need the seller's VAT registration in {where}"
                    f" (rule {rule.id}); add it to issuer.yaml vat_registrations, or set"
                    f" `b2c_unregistered: not_collecting` for {country} in tax_rules.yaml"
                )
            mechanism = rule.b2b_if_unregistered if business else Mechanism.NOT_COLLECTING
        treatment = Treatment(mechanism.value)
        vat_id: str | None
        if domestic:
            vat_id = with_prefix(country, seller.tax_id)
        else:
            # the registration's own prefix: the non-Union OSS number is EU…, whichever member state buys
            vat_id = with_prefix(registration.country, registration.number) if registration else None
        rate_text = "-" if rule.rate is None else format(rule.rate.normalize(), "f")
        collecting = treatment is not Treatment.NOT_COLLECTING
        return TaxTreatment(
            treatment=treatment,
            rate=rule.rate,
            mechanism=mechanism,
            wording=self._wording(treatment, rule.wording, country=country, rate=rate_text),
            rule_id=rule.id,
            tax_currency=cfg.tax_currency if collecting else None,
            fx_date_rule=cfg.fx_date_rule,
            country=country,
            business=business,
            seller_registered=registered,
            seller_vat_id=vat_id,
        )

    def seller_ledger(self, buyer: Buyer, seller: Seller, supply_date: date) -> TaxTreatment:
        """The seller's own-books treatment (CN ledger) for this sale."""
        if buyer.billing_country.upper() == seller.country:
            domestic = self.determine(buyer, seller, supply_date)
            ledger_rule: LedgerRule | None = _in_force(self.seller_ledger_rules, supply_date)
            fx_rule = ledger_rule.fx_date_rule if ledger_rule else FxDateRule.FIRST_OF_MONTH
            return TaxTreatment(
                domestic.treatment,
                domestic.rate,
                domestic.mechanism,
                domestic.wording,
                domestic.rule_id,
                None,
                fx_rule,
                seller.country,
                domestic.business,
                True,
                domestic.seller_vat_id,
            )
        rule: LedgerRule | None = _in_force(self.seller_ledger_rules, supply_date)
        if rule is None:
            raise TaxRuleMissing(f"no seller ledger rule in force on {supply_date.isoformat()}")
        business = buyer.business and bool(buyer.tax_id)
        treatment = rule.b2b if business else rule.b2c
        return TaxTreatment(
            treatment,
            Decimal(0),
            None,
            self._wording(treatment, rule.wording, country=seller.country, rate="0"),
            rule.id,
            None,
            rule.fx_date_rule,
            seller.country,
            business,
            True,
            with_prefix(seller.country, seller.tax_id),
        )


def parse(data: Any, *, file: str = "<tax rules>") -> TaxRules:
    cfg = validate(_File, data, file)
    for cc, country in cfg.countries.items():
        if len(cc) != 2 or not cc.isupper():
            raise ConfigError(file, f"countries.{cc}", "use ISO 3166 alpha-2 codes in upper case")
        spans = sorted(country.rules, key=lambda r: r.effective_from)
        for i, rule in enumerate(spans):
            if rule.effective_to is not None and rule.effective_to < rule.effective_from:
                raise ConfigError(
                    file, f"countries.{cc}.rules.{rule.id}", "effective_to is before effective_from"
                )
            if rule.rate is None and Mechanism.SUPPLIER_CHARGES in (rule.b2b, rule.b2c):
                raise ConfigError(
                    file, f"countries.{cc}.rules.{rule.id}.rate", "supplier_charges needs a rate"
                )
            nxt = spans[i + 1] if i + 1 < len(spans) else None
            if nxt is not None and (rule.effective_to is None or rule.effective_to >= nxt.effective_from):
                raise ConfigError(file, f"countries.{cc}.rules.{rule.id}", f"overlaps rule {nxt.id}")
    return TaxRules(
        seller_country=cfg.seller_country,
        ledger_currency=check_currency(cfg.ledger_currency),
        default_wording=_freeze(cfg.default_wording),
        seller_ledger_rules=tuple(
            LedgerRule(
                r.id,
                r.effective_from,
                r.effective_to,
                r.b2b,
                r.b2c,
                r.fx_date_rule,
                _freeze(r.wording),
                r.note,
            )
            for r in sorted(cfg.seller_ledger, key=lambda r: r.effective_from)
        ),
        by_country=MappingProxyType(
            {
                cc: CountryTax(
                    c.tax_point,
                    c.tax_currency,
                    c.fx_date_rule,
                    tuple(
                        TaxRule(
                            r.id,
                            r.effective_from,
                            r.effective_to,
                            r.rate,
                            r.b2b,
                            r.b2c,
                            r.b2b_if_unregistered,
                            _freeze(r.wording),
                            r.note,
                        )
                        for r in sorted(c.rules, key=lambda r: r.effective_from)
                    ),
                    c.b2c_unregistered,
                )
                for cc, c in cfg.countries.items()
            }
        ),
    )


def load(path: str | Path) -> TaxRules:
    return parse(read_yaml(path), file=str(path))
