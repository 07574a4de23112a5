"""The billing error hierarchy. Every error names what is wrong and where, so a caller can show it.

::

    BillingError
    ├── ConfigError            a config file is invalid (names the file and the field)
    ├── CurrencyError          not an ISO 4217 code, or two currencies mixed (also a ValueError)
    ├── PriceBookNotFound      no price book version covers the period in that currency
    ├── PriceMissing           a used model / token type has no price (never a silent zero)
    ├── FxRateMissing          no FX rate for (from, to, date) (never "the latest rate")
    ├── FxImportError          an FX CSV row is malformed or contradicts another row
    ├── TaxRuleMissing         a configured country has no tax rule in force on the date
    ├── TaxHeld                a consumer sale the seller may not invoice there (not registered)
    ├── TaxIdInvalid           a tax identifier fails its country's format or checksum
    ├── InvalidUsage           usage quantities that cannot be billed (negative, bad period ...)
    └── DocumentStateError     an operation that the document's status forbids (e.g. UBL of a draft)

All of them are expected outcomes (a caller maps them to 4xx / a CLI error), never crashes.
"""

from __future__ import annotations


class BillingError(Exception):
    """Base class of every billing error."""


class ConfigError(BillingError):
    def __init__(self, file: str, field: str, message: str) -> None:
        self.file = file
        self.field = field
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class CurrencyError(BillingError, ValueError):
    pass


class PriceBookNotFound(BillingError):
    pass


class PriceMissing(BillingError):
    pass


class FxRateMissing(BillingError):
    pass


class FxImportError(BillingError):
    pass


class TaxRuleMissing(BillingError):
    pass


class TaxHeld(BillingError):
    """A consumer sale in a country whose rules want the seller registered, and it is not: the usage
    is held (not invoiced with wording that would have a consumer self-assess)."""


class TaxIdInvalid(BillingError):
    def __init__(self, country: str, tax_id: str, reason: str) -> None:
        self.country = country
        self.tax_id = tax_id
        self.reason = reason
        super().__init__(f"invalid tax id {tax_id!r} for {country}: {reason}")


class InvalidUsage(BillingError):
    pass


class DocumentStateError(BillingError):
    pass
