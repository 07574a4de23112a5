from decimal import Decimal

import pytest

from billing.money import CurrencyError, Money, check_currency, fmt, minor_units, round_money, to_decimal


@pytest.mark.parametrize(
    ("currency", "units"),
    [
        ("USD", 2),
        ("CNY", 2),
        ("KZT", 2),
        ("SAR", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("KWD", 3),
        ("BHD", 3),
        ("IRR", 2),  # ISO says 2 (CLDR says 0): the ISO table wins
        ("CLF", 4),
        ("uzs", 2),
    ],
)
def test_minor_units_follow_iso_4217(currency: str, units: int) -> None:
    assert minor_units(currency) == units


def test_unknown_currency_is_an_error() -> None:
    with pytest.raises(CurrencyError, match="XYZ"):
        check_currency("XYZ")
    with pytest.raises(CurrencyError):
        minor_units("DOLLAR")


@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [
        ("0.005", "USD", "0.01"),  # half up, not banker's
        ("0.015", "USD", "0.02"),
        ("0.025", "USD", "0.03"),
        ("0.0049999", "USD", "0.00"),
        ("-0.005", "USD", "-0.01"),  # half away from zero
        ("2.5", "JPY", "3"),
        ("3.5", "JPY", "4"),
        ("1.0005", "KWD", "1.001"),
        ("444.105", "CNY", "444.11"),
    ],
)
def test_round_half_up_to_minor_units(value: str, currency: str, expected: str) -> None:
    rounded = round_money(Decimal(value), currency)
    assert fmt(rounded) == expected


def test_money_is_never_a_float() -> None:
    with pytest.raises(TypeError, match="float"):
        to_decimal(0.1)
    with pytest.raises(TypeError):
        Money(0.1, "USD")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        to_decimal("NaN")
    with pytest.raises(ValueError):
        to_decimal("abc")


def test_money_arithmetic_keeps_currency() -> None:
    a = Money.of(Decimal("1.005"), "USD")
    assert a == Money(Decimal("1.01"), "USD")
    assert str(a + Money(Decimal("2.00"), "usd")) == "3.01 USD"
    assert str(-(a - Money.zero("USD"))) == "-1.01 USD"
    with pytest.raises(CurrencyError, match="USD with CNY"):
        a + Money(Decimal(1), "CNY")


def test_fmt_never_uses_exponent_notation() -> None:
    assert fmt(Decimal("1E-12")) == "0.000000000001"
    assert fmt(Decimal("1.2E+3")) == "1200"


def test_to_decimal_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="list"):
        to_decimal([1])
    assert to_decimal(3) == Decimal(3) and to_decimal(Decimal("1.5")) == Decimal("1.5")
