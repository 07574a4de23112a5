"""The seller (issuer, loaded from configs/billing/issuer.yaml) and the buyer (a tenant)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from billing.config_io import read_yaml, validate
from billing.errors import ConfigError, TaxIdInvalid
from billing.taxid import validate as validate_tax_id


@dataclass(frozen=True, slots=True)
class Buyer:
    id: str
    name: str
    billing_country: str
    tax_id: str | None
    business: bool
    currency: str
    language: str


@dataclass(frozen=True, slots=True)
class BankDetails:
    bank_name: str
    account_name: str
    account_number: str
    swift: str


@dataclass(frozen=True, slots=True)
class VatRegistration:
    """The seller's own VAT registration in a buyer country (e.g. RU foreign e-service provider)."""

    country: str
    number: str
    effective_from: date
    effective_to: date | None = None

    def active_on(self, on: date) -> bool:
        return self.effective_from <= on and (self.effective_to is None or on <= self.effective_to)


@dataclass(frozen=True, slots=True)
class NumberSeries:
    invoice_prefix: str
    credit_note_prefix: str
    digits: int = 6
    receipt_prefix: str | None = None

    @property
    def receipts(self) -> str:
        """The prefix of prepaid-credit receipts (``TP-RCP-``)."""
        if self.receipt_prefix:
            return self.receipt_prefix
        inv = self.invoice_prefix
        return inv.replace("INV", "RCP") if "INV" in inv else f"{inv}RCP-"

    def format(self, kind: str, year: int, sequence: int) -> str:
        """``TP-INV-2026-000042``: numbers come from the store's gapless counter, per kind and year."""
        prefix = {"invoice": self.invoice_prefix, "receipt": self.receipts}.get(kind, self.credit_note_prefix)
        return f"{prefix}{year}-{sequence:0{self.digits}d}"


@dataclass(frozen=True, slots=True)
class Seller:
    id: str
    legal_name: str
    local_name: str
    address_lines: tuple[str, ...]
    city: str
    postal_code: str
    country: str
    tax_id: str
    email: str
    payment_terms_days: int
    bank: BankDetails
    numbering: NumberSeries
    vat_registrations: tuple[VatRegistration, ...] = ()
    sample: bool = False  # the shipped example issuer: production mode refuses to issue with it

    def registration_in(self, country: str, on: date) -> VatRegistration | None:
        """The seller's VAT registration in ``country`` in force on ``on`` (None: not registered)."""
        for reg in self.vat_registrations:
            if reg.country == country and reg.active_on(on):
                return reg
        return None


class _Bank(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bank_name: str
    account_name: str
    account_number: str
    swift: str = Field(pattern=r"^[A-Z]{6}[A-Z0-9]{2}([A-Z0-9]{3})?$")


class _Numbering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invoice_prefix: str
    credit_note_prefix: str
    receipt_prefix: str | None = None  # prepaid-credit receipts; default: the invoice prefix's INV -> RCP
    digits: int = Field(default=6, ge=1, le=12)


class _Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    number: str
    effective_from: date
    effective_to: date | None = None


class _Issuer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    legal_name: str
    local_name: str = ""
    address_lines: list[str]
    city: str
    postal_code: str
    country: str = Field(pattern=r"^[A-Z]{2}$")
    tax_id: str
    email: str
    payment_terms_days: int = Field(default=30, ge=0, le=365)
    bank: _Bank
    numbering: _Numbering
    vat_registrations: dict[str, _Registration] = Field(default_factory=dict)
    sample: bool = False


def load_seller(path: str | Path) -> Seller:
    """Load and validate the issuer file; tax ids are checked by their country's validator."""
    file = str(path)
    cfg = validate(_Issuer, read_yaml(path), file)
    try:
        tax_id = validate_tax_id(cfg.country, cfg.tax_id)
        regs = tuple(
            VatRegistration(cc, validate_tax_id(cc, reg.number), reg.effective_from, reg.effective_to)
            for cc, reg in sorted(cfg.vat_registrations.items())
        )
    except TaxIdInvalid as exc:
        raise ConfigError(
            file,
            "tax_id" if exc.country == cfg.country else f"vat_registrations.{exc.country}.number",
            str(exc),
        ) from exc
    return Seller(
        id=cfg.id,
        legal_name=cfg.legal_name,
        local_name=cfg.local_name,
        address_lines=tuple(cfg.address_lines),
        city=cfg.city,
        postal_code=cfg.postal_code,
        country=cfg.country,
        tax_id=tax_id,
        email=cfg.email,
        payment_terms_days=cfg.payment_terms_days,
        bank=BankDetails(**cfg.bank.model_dump()),
        numbering=NumberSeries(**cfg.numbering.model_dump()),
        vat_registrations=regs,
        sample=cfg.sample,
    )
