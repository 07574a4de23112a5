from decimal import Decimal

import pytest

from billing.errors import CurrencyError
from billing.money import (
    check_currency,
    fmt,
    from_micro,
    metric_value,
    minor_units,
    round_money,
    to_decimal,
    to_micro,
    token_cost,
)


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
    with pytest.raises(ValueError):
        to_decimal("NaN")
    with pytest.raises(ValueError):
        to_decimal("abc")


def test_budget_millionths_round_up_and_come_back_exact() -> None:
    assert to_micro(Decimal("0.0000001")) == 1  # a hold is never under-counted
    assert to_micro(Decimal("1.25")) == 1_250_000
    assert to_micro(Decimal("-0.0000019")) == -1
    assert from_micro(1_250_001) == Decimal("1.250001")
    assert token_cost(3_000_000, Decimal("0.30")) == Decimal("0.9")
    assert token_cost(1, Decimal("0.30")) == Decimal("0.0000003")


def test_the_metric_float_is_made_in_one_place() -> None:
    assert metric_value(Decimal("0.25")) == 0.25 and isinstance(metric_value(Decimal(1)), float)


def test_fmt_never_uses_exponent_notation() -> None:
    assert fmt(Decimal("1E-12")) == "0.000000000001"
    assert fmt(Decimal("1.2E+3")) == "1200"


def test_to_decimal_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="list"):
        to_decimal([1])
    assert to_decimal(3) == Decimal(3) and to_decimal(Decimal("1.5")) == Decimal("1.5")
