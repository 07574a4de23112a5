"""Money in one shape per purpose, and the conversions between them (only here).

* Invoices: exact ``Decimal`` amounts next to the document's ISO 4217 currency, rounded by the
  policy below (`round_money`).
* Budgets (serving/limits): integer millionths of the currency's major unit (`to_micro`, rounded
  up; `from_micro`), so holds and settlements are exact integer arithmetic in the limiter.
* The spend metric (serving/spend.py): a float, made by `metric_value` at the Prometheus boundary
  only.

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
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

import pycountry

from billing.errors import CurrencyError as CurrencyError

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


def whole_minor_units(value: Decimal, currency: str) -> bool:
    """True when ``value`` is a whole number of the currency's minor units (10.01 USD, not 10.005):
    what a payment, a write-off or a credited amount must be."""
    return value == round_money(value, currency)


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


# --- the other shapes of money, converted here only ---------------------------------------------
MICRO = Decimal(1_000_000)  # budgets hold money in integer millionths of the currency's major unit
PER_MILLION_TOKENS = Decimal(1_000_000)  # price book prices are per one million tokens


def to_micro(amount: Decimal) -> int:
    """An amount as integer millionths, rounded up (a budget hold or charge is never under-counted)."""
    return int((amount * MICRO).to_integral_value(rounding=ROUND_CEILING))


def from_micro(units: int) -> Decimal:
    """Integer millionths back to an exact Decimal amount."""
    return Decimal(units) / MICRO


def token_cost(tokens: int | Decimal, price_per_million: Decimal) -> Decimal:
    """The exact, unrounded cost of `tokens` tokens at a price per one million tokens."""
    return price_per_million * tokens / PER_MILLION_TOKENS


def metric_value(amount: Decimal) -> float:
    """The only float money: a value handed to a Prometheus counter (estimates, never invoices)."""
    return float(amount)
