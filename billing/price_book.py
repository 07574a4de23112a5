"""Price books: prices per 1M tokens by version, currency, model and token type; tiers; contracts.

File format (``configs/billing/price_books.yaml``)::

    price_books:
      - version: "2026.1"
        effective_from: 2026-01-01
        effective_to: null                 # inclusive last day; null = open-ended
        currencies:
          USD:
            minimum_commitment: null       # or "100.00": monthly minimum (top-up line)
            batch_discount: "0.5"          # optional: Batch API usage at 50% off (its own invoice lines)
            models:
              smollm2-135m-instruct:
                input: "0.020"             # flat price per 1M tokens, up to 12 decimals, quoted
                output:
                  mode: graduated          # graduated | volume
                  tiers:
                    - {up_to: 100000000, price: "0.30"}   # tokens, inclusive upper bound
                    - {up_to: null, price: "0.24"}
    contracts:                             # per-tenant overrides
      - id: acme-2026
        tenant: t-acme
        currency: USD
        effective_from: 2026-01-01
        effective_to: null
        minimum_commitment: "500.00"
        models: {qwen2.5-7b-instruct: {output: "0.80"}}

Batch discount: usage metered as a Batch API line (endpoint ``batch.*``, metering/events.py) is
priced at ``price x (1 - batch_discount)``, through the tiers on its own quantity; a contract's
``batch_discount`` replaces the book's. Without one, batch usage costs what live usage costs.

Tariff (``tariff`` at the currency level of a version, or in a contract, which replaces the book's):
``tokens`` (the default: tokens as metered), ``english_equivalent`` (tokens ÷ the language's premium on
the model's tokenizer, configs/billing/language_premiums.csv) or ``per_character`` (the prompt's and
the completion's characters, priced per 1M characters). billing/tariffs.py converts; the prices of
the book are then per 1M billed units.

Tiers: a tier covers (previous up_to, up_to]. **Graduated**: each part of the quantity is priced by
the tier it falls in (one invoice line per tier used). **Volume**: the whole quantity is priced by
the tier that the total falls in.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.config_io import decimal_text, read_yaml, validate
from billing.errors import ConfigError, PriceBookNotFound, PriceMissing
from billing.money import check_currency, to_decimal
from metering.events import TokenType

PER = 1_000_000  # prices are per one million tokens
MAX_PRICE_DECIMALS = 12


class TierMode(enum.StrEnum):
    FLAT = "flat"
    GRADUATED = "graduated"
    VOLUME = "volume"


@dataclass(frozen=True, slots=True)
class Tier:
    up_to: int | None
    price: Decimal


@dataclass(frozen=True, slots=True)
class PriceSpec:
    mode: TierMode
    tiers: tuple[Tier, ...]


@dataclass(frozen=True, slots=True)
class Segment:
    """A part of a quantity priced at one unit price; ``tier`` is 1-based (None for flat prices)."""

    tier: int | None
    quantity: int
    unit_price: Decimal


def rate(spec: PriceSpec, quantity: int) -> list[Segment]:
    """Split ``quantity`` (tokens, >= 0) into priced segments according to the tier mode."""
    if quantity <= 0:
        return []
    if spec.mode is TierMode.FLAT:
        return [Segment(None, quantity, spec.tiers[0].price)]
    if spec.mode is TierMode.VOLUME:
        index, tier = next(
            (i, t) for i, t in enumerate(spec.tiers, 1) if t.up_to is None or quantity <= t.up_to
        )
        return [Segment(index, quantity, tier.price)]
    segments: list[Segment] = []
    lower = 0
    for index, tier in enumerate(spec.tiers, 1):
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        if upper > lower:
            segments.append(Segment(index, upper - lower, tier.price))
        if tier.up_to is None or quantity <= tier.up_to:
            break
        lower = tier.up_to
    return segments


Prices = Mapping[tuple[str, TokenType], PriceSpec]


class Tariff(enum.StrEnum):
    """What one billed unit is (billing/tariffs.py)."""

    TOKENS = "tokens"
    ENGLISH_EQUIVALENT = "english_equivalent"
    PER_CHARACTER = "per_character"


@dataclass(frozen=True, slots=True)
class CurrencyPrices:
    prices: Prices
    minimum_commitment: Decimal | None
    batch_discount: Decimal = Decimal(0)  # fraction off for Batch API usage, 0 <= d < 1
    tariff: Tariff = Tariff.TOKENS


@dataclass(frozen=True, slots=True)
class PriceBookVersion:
    version: str
    effective_from: date
    effective_to: date | None
    currencies: Mapping[str, CurrencyPrices]

    def covers(self, start: date, end: date) -> bool:
        return self.effective_from <= start and (self.effective_to is None or end <= self.effective_to)

    def touches(self, start: date, end: date) -> bool:
        return self.effective_from <= end and (self.effective_to is None or start <= self.effective_to)


@dataclass(frozen=True, slots=True)
class Contract:
    id: str
    tenant: str
    currency: str
    effective_from: date
    effective_to: date | None
    prices: Prices
    minimum_commitment: Decimal | None
    batch_discount: Decimal | None = None  # None: the book's
    tariff: Tariff | None = None  # None: the book's


@dataclass(frozen=True, slots=True)
class ResolvedPrices:
    """The prices that apply to one tenant, currency and period."""

    version: str
    contract_id: str | None
    currency: str
    prices: Prices
    minimum_commitment: Decimal | None
    batch_discount: Decimal = Decimal(0)
    tariff: Tariff = Tariff.TOKENS

    def batch_price(self, unit_price: Decimal) -> Decimal:
        """A unit price for Batch API usage: the price less the batch discount (exact)."""
        return unit_price * (1 - self.batch_discount)

    def price(self, model: str, token_type: TokenType) -> PriceSpec:
        spec = self.prices.get((model, token_type))
        if spec is None:
            where = f"price book {self.version}" + (
                f" / contract {self.contract_id}" if self.contract_id else ""
            )
            raise PriceMissing(
                f"no {self.currency} price for model {model!r} token type {token_type.value!r} in {where}"
            )
        return spec


@dataclass(frozen=True, slots=True)
class PriceBook:
    """Every price book version and tenant contract from one file."""

    versions: tuple[PriceBookVersion, ...]
    contracts: tuple[Contract, ...] = ()

    def spans(self, *, currency: str, period_start: date, period_end: date) -> list[tuple[date, date]]:
        """The parts of the period each priced by one version (one part unless the price changes inside
        it)."""
        ccy = check_currency(currency)
        out: list[tuple[date, date]] = []
        day = period_start
        for v in sorted((v for v in self.versions if ccy in v.currencies), key=lambda v: v.effective_from):
            if v.effective_from <= day and (v.effective_to is None or day <= v.effective_to):
                last = period_end if v.effective_to is None else min(period_end, v.effective_to)
                out.append((day, last))
                day = last + timedelta(days=1)
                if day > period_end:
                    return out
        raise PriceBookNotFound(
            f"no price book version in {ccy} covers {period_start}..{period_end}"
            + (f" (nothing from {day})" if out else "")
        )

    def tariff(self, *, currency: str, day: date, tenant_id: str) -> Tariff:
        """The tariff in force for the tenant that day (the contract's, else the version's; tokens when
        no version covers the day: pricing reports that)."""
        ccy = currency.upper()
        for c in self.contracts:
            if (
                c.tenant == tenant_id
                and c.currency == ccy
                and c.tariff is not None
                and c.effective_from <= day
                and (c.effective_to is None or day <= c.effective_to)
            ):
                return c.tariff
        for v in self.versions:
            if ccy in v.currencies and v.covers(day, day):
                return v.currencies[ccy].tariff
        return Tariff.TOKENS

    def select(
        self, *, currency: str, period_start: date, period_end: date, tenant_id: str
    ) -> ResolvedPrices:
        ccy = check_currency(currency)
        candidates = [v for v in self.versions if ccy in v.currencies]
        chosen = [v for v in candidates if v.covers(period_start, period_end)]
        if not chosen:
            partial = [v.version for v in candidates if v.touches(period_start, period_end)]
            hint = f"; the period spans versions {partial}: split it" if len(partial) > 1 else ""
            raise PriceBookNotFound(
                f"no price book version in {ccy} covers {period_start}..{period_end}{hint}"
            )
        book = chosen[0]
        base = book.currencies[ccy]
        prices = dict(base.prices)
        minimum = base.minimum_commitment
        discount = base.batch_discount
        tariff = base.tariff
        contract = next(
            (
                c
                for c in self.contracts
                if c.tenant == tenant_id
                and c.currency == ccy
                and c.effective_from <= period_start
                and (c.effective_to is None or period_end <= c.effective_to)
            ),
            None,
        )
        if contract is not None:
            prices.update(contract.prices)
            if contract.minimum_commitment is not None:
                minimum = contract.minimum_commitment
            if contract.batch_discount is not None:
                discount = contract.batch_discount
            if contract.tariff is not None:
                tariff = contract.tariff
        return ResolvedPrices(
            book.version,
            contract.id if contract else None,
            ccy,
            MappingProxyType(prices),
            minimum,
            discount,
            tariff,
        )


# ---- file validation (pydantic only at this boundary) ------------------------------------------


def _price(value: Any) -> Decimal:
    amount = to_decimal(decimal_text(value))
    if amount < 0:
        raise ValueError("a price cannot be negative")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_PRICE_DECIMALS:
        raise ValueError(f"at most {MAX_PRICE_DECIMALS} decimals per price")
    return amount


class _Tier(BaseModel):
    model_config = ConfigDict(extra="forbid")
    up_to: int | None = Field(gt=0)
    price: Decimal

    @field_validator("price", mode="before")
    @classmethod
    def _exact(cls, value: Any) -> Decimal:
        return _price(value)


class _Tiered(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: TierMode
    tiers: list[_Tier] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return value
        return {"mode": TierMode.FLAT, "tiers": [{"up_to": None, "price": value}]}

    @model_validator(mode="after")
    def _ordered(self) -> _Tiered:
        if self.mode is TierMode.FLAT and len(self.tiers) != 1:
            raise ValueError("mode flat takes exactly one tier")
        bounds = [t.up_to for t in self.tiers]
        if bounds[-1] is not None:
            raise ValueError("the last tier must have up_to: null")
        if any(b is None for b in bounds[:-1]):
            raise ValueError("only the last tier may have up_to: null")
        finite = [b for b in bounds[:-1] if b is not None]
        if finite != sorted(set(finite)):
            raise ValueError("tier up_to values must increase strictly")
        return self

    def spec(self) -> PriceSpec:
        return PriceSpec(self.mode, tuple(Tier(t.up_to, t.price) for t in self.tiers))


class _Models(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, dict[TokenType, _Tiered]] = Field(default_factory=dict)
    minimum_commitment: Decimal | None = None
    batch_discount: Decimal | None = None
    tariff: Tariff | None = None

    @field_validator("minimum_commitment", mode="before")
    @classmethod
    def _minimum(cls, value: Any) -> Any:
        return None if value is None else _price(value)

    @field_validator("batch_discount", mode="before")
    @classmethod
    def _discount(cls, value: Any) -> Any:
        if value is None:
            return None
        amount = to_decimal(decimal_text(value))
        if not 0 <= amount < 1:
            raise ValueError("batch_discount is a fraction off: at least 0 and below 1 (0.5 = half price)")
        return amount

    def prices(self) -> Prices:
        return MappingProxyType(
            {(m, t): s.spec() for m, types in self.models.items() for t, s in types.items()}
        )


class _Version(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1)
    effective_from: date
    effective_to: date | None = None
    currencies: dict[str, _Models] = Field(min_length=1)

    @field_validator("currencies")
    @classmethod
    def _codes(cls, value: dict[str, _Models]) -> dict[str, _Models]:
        return {check_currency(k): v for k, v in value.items()}


class _Contract(_Models):
    id: str
    tenant: str
    currency: str
    effective_from: date
    effective_to: date | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    price_books: list[_Version] = Field(min_length=1)
    contracts: list[_Contract] = Field(default_factory=list)


def _overlap(a_from: date, a_to: date | None, b_from: date, b_to: date | None) -> bool:
    return (a_to is None or b_from <= a_to) and (b_to is None or a_from <= b_to)


def _refuse_gaps(versions: tuple[PriceBookVersion, ...], file: str) -> None:
    """Per currency, versions follow each other day after day: a day without prices is a mistake."""
    for ccy in sorted({c for v in versions for c in v.currencies}):
        chain = sorted((v for v in versions if ccy in v.currencies), key=lambda v: v.effective_from)
        for a, b in itertools.pairwise(chain):
            if a.effective_to is not None and a.effective_to + timedelta(days=1) < b.effective_from:
                raise ConfigError(
                    file,
                    "price_books",
                    f"{ccy} has no prices from {a.effective_to + timedelta(days=1)} to"
                    f" {b.effective_from - timedelta(days=1)}"
                    f" (between versions {a.version!r} and {b.version!r})",
                )


def parse(data: Any, *, file: str = "<price book>") -> PriceBook:
    cfg = validate(_File, data, file)
    versions = tuple(
        PriceBookVersion(
            v.version,
            v.effective_from,
            v.effective_to,
            MappingProxyType(
                {
                    c: CurrencyPrices(
                        m.prices(),
                        m.minimum_commitment,
                        m.batch_discount or Decimal(0),
                        m.tariff or Tariff.TOKENS,
                    )
                    for c, m in v.currencies.items()
                }
            ),
        )
        for v in cfg.price_books
    )
    for i, a in enumerate(versions):
        if a.effective_to is not None and a.effective_to < a.effective_from:
            raise ConfigError(file, f"price_books.{i}.effective_to", "is before effective_from")
        for b in versions[i + 1 :]:
            shared = set(a.currencies) & set(b.currencies)
            if a.version == b.version:
                raise ConfigError(file, f"price_books.{i}.version", f"duplicate version {a.version!r}")
            if shared and _overlap(a.effective_from, a.effective_to, b.effective_from, b.effective_to):
                raise ConfigError(
                    file,
                    f"price_books.{i}",
                    f"versions {a.version!r} and {b.version!r} overlap in {sorted(shared)}",
                )
    _refuse_gaps(versions, file)
    contracts: list[Contract] = []
    for i, c in enumerate(cfg.contracts):
        try:
            currency = check_currency(c.currency)
        except Exception as exc:
            raise ConfigError(file, f"contracts.{i}.currency", str(exc)) from exc
        contract = Contract(
            c.id,
            c.tenant,
            currency,
            c.effective_from,
            c.effective_to,
            c.prices(),
            c.minimum_commitment,
            c.batch_discount,
            c.tariff,
        )
        for other in contracts:
            if (other.tenant, other.currency) == (contract.tenant, contract.currency) and _overlap(
                other.effective_from, other.effective_to, contract.effective_from, contract.effective_to
            ):
                raise ConfigError(file, f"contracts.{i}", f"overlaps contract {other.id!r} for {c.tenant}")
        contracts.append(contract)
    return PriceBook(versions, tuple(contracts))


def load(path: str | Path) -> PriceBook:
    return parse(read_yaml(path), file=str(path))
