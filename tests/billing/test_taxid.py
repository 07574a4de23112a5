import pytest

from billing.errors import TaxIdInvalid
from billing.taxid import validate, with_prefix


@pytest.mark.parametrize(
    ("country", "raw", "normalized"),
    [
        ("CN", "91120116MA05T8QX3G", "91120116MA05T8QX3G"),
        ("RU", "7707083893", "7707083893"),
        ("RU", "RU 7707083893", "7707083893"),
        ("BY", "200988541", "200988541"),
        ("IN", "27AAPFU0939F1ZV", "27AAPFU0939F1ZV"),
        ("TR", "4540536920", "4540536920"),
        ("EG", "100-531-385", "100531385"),
        ("KZ", "940140000385", "940140000385"),  # real BINs pass the mod-11 check digit
        ("KZ", "990 140 004 654", "990140004654"),
        ("SA", "SA300000000000003", "300000000000003"),
        ("AE", "100123456700003", "100123456700003"),
        ("UZ", "302936161", "302936161"),
        ("KG", "01234567890123", "01234567890123"),
        ("TJ", "123456789", "123456789"),
        ("PK", "1234567-8", "12345678"),
        ("BR", "12.345.678/0001-95", "12345678000195"),  # no validator: permissive format check
    ],
)
def test_valid_tax_ids_are_normalized(country: str, raw: str, normalized: str) -> None:
    assert validate(country, raw) == normalized


@pytest.mark.parametrize(
    ("country", "raw", "reason"),
    [
        ("CN", "91120116MA05T8QX3A", "checksum"),
        ("RU", "7707083894", "checksum"),
        ("KZ", "940140000386", "check digit"),
        ("KZ", "94014000038", "12 digits"),
        ("SA", "300000000000004", "KSA VAT number"),
        ("SA", "30000000000003", "15 digits"),
        ("AE", "200123456700003", "UAE TRN"),
        ("UZ", "30293616", "9 digits"),
        ("PK", "12AB", "NTN"),
        ("BR", "x", "4-20"),
        ("IN", "", "empty"),
    ],
)
def test_invalid_tax_ids_raise_a_clear_error(country: str, raw: str, reason: str) -> None:
    with pytest.raises(TaxIdInvalid) as err:
        validate(country, raw)
    assert err.value.country == country and reason in str(err.value)


def test_with_prefix() -> None:
    assert with_prefix("SA", "300000000000003") == "SA300000000000003"
    assert with_prefix("RU", "RU7707083893") == "RU7707083893"


def test_kz_number_without_possible_check_digit() -> None:
    # both weight passes give 10 for these first 11 digits: no valid BIN/IIN can start with them
    with pytest.raises(TaxIdInvalid, match="check digit"):
        validate("KZ", "910000000100")
