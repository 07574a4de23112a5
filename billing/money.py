"""Decimal money with ISO 4217 minor units and the one rounding policy.

Policy (the only one in billing):

* Arithmetic is exact ``Decimal`` (context precision 50); floats are refused.
* A value is rounded **once**, to the currency's ISO 4217 minor units, with ``ROUND_HALF_UP``
  (half away from zero), at these points only:

  - an invoice line amount  = quantity x unit price, rounded;
  - a tax subtotal amount   = taxable amount x rate / 100, rounded (EN 16931 BR-CO-17);
  - an amount converted to another currency = unrounded source x FX rate, rounded.

  Sums of rounded values (subtotal = sum of lines, total = subtotal + tax) need no rounding.
* The unrounded value is kept next to the rounded one (``InvoiceLine.amount_unrounded``).

Minor units come from ISO 4217 itself (own table below, not CLDR: CLDR differs for e.g. IRR and
some cash digits). Every currency that ``pycountry`` knows and that is not listed has 2 minor units.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import pycountry

from billing.errors import CurrencyError as CurrencyError  # noqa: PLC0414 - re-exported

ROUNDING = ROUND_HALF_UP
_CTX = decimal.Context(prec=50, rounding=ROUND_HALF_UP)

# ISO 4217 currencies whose minor unit is not 2 (list of 2024 amendments).
_ISO_MINOR_UNITS: dict[str, int] = {
    **{
        c: 0
        for c in (
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        )
    },
    **{c: 3 for c in ("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND")},
    "CLF": 4,
    "UYW": 4,
}


def check_currency(code: str) -> str:
    """Return the ISO 4217 code in upper case, or raise CurrencyError."""
    upper = code.upper()
    if len(upper) != 3 or pycountry.currencies.get(alpha_3=upper) is None:
        raise CurrencyError(f"unknown ISO 4217 currency code {code!r}")
    return upper


def minor_units(currency: str) -> int:
    """ISO 4217 minor units: USD 2, JPY 0, KWD 3, KZT 2."""
    return _ISO_MINOR_UNITS.get(check_currency(currency), 2)


def to_decimal(value: object) -> Decimal:
    """Exact Decimal from str/int/Decimal; floats are refused (money is never a float)."""
    if isinstance(value, bool | float):
        raise TypeError(f"money must not be a float or bool: {value!r}; write it as a string")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, (int, str)):
        try:
            result = Decimal(value)
        except decimal.InvalidOperation as exc:
            raise ValueError(f"not a decimal number: {value!r}") from exc
    else:
        raise TypeError(f"cannot make a Decimal from {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return result


def quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-minor_units(currency))


def round_money(value: Decimal, currency: str) -> Decimal:
    """The one rounding policy: ROUND_HALF_UP to the currency's minor units."""
    return value.quantize(quantum(currency), rounding=ROUNDING, context=_CTX)


def mul(*factors: Decimal) -> Decimal:
    """Exact product (50 significant digits) for quantity x price x rate."""
    result = Decimal(1)
    for factor in factors:
        result = _CTX.multiply(result, factor)
    return result


def div(a: Decimal, b: Decimal) -> Decimal:
    return _CTX.divide(a, b)


def fmt(value: Decimal) -> str:
    """Plain decimal string for storage (never exponent notation)."""
    return format(value, "f")


@dataclass(frozen=True, slots=True)
class Money:
    """A rounded amount with its currency."""

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "currency", check_currency(self.currency))
        object.__setattr__(self, "amount", to_decimal(self.amount))

    @classmethod
    def of(cls, value: Decimal, currency: str) -> Money:
        """Round ``value`` by the policy and wrap it."""
        return cls(round_money(value, currency), currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls.of(Decimal(0), currency)

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyError(f"cannot combine {self.currency} with {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount - other.amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __str__(self) -> str:
        return f"{fmt(self.amount)} {self.currency}"
