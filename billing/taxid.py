"""Tax identifier validation per country: ``validate(country, tax_id) -> normalized``.

python-stdnum where it has a module (CN USCC, RU INN, BY UNP, IN GSTIN, TR VKN, EG TN); own small
validators where it has none:

* KZ BIN/IIN: 12 digits, check digit = weighted sum mod 11 with weights 1..11, and if that is 10 a
  second pass with weights 3..11,1,2 (a second 10 is invalid). Checked on real BINs.
* SA VAT number (TRN): 15 digits, first and last digit 3.
* AE TRN: 15 digits starting with 100.
* UZ STIR (INN): 9 digits; KG INN: 14 digits; TJ INN: 9 digits; PK NTN: 7 digits + check char
  or 13-digit CNIC (format only: no public checksum found).

A leading ISO 3166 country prefix (``SA3000...``, ``RU7707...``) is accepted and stripped: the
normalized form carries no prefix; UBL writers add it where EN 16931 wants one (BR-CO-09).
Countries without a validator get a permissive format check (4-20 letters/digits) so a buyer is
never blocked for lack of a validator; their ids are still normalized.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType

from stdnum.by import unp
from stdnum.cn import uscc
from stdnum.eg import tn
from stdnum.eu import vat as eu_vat
from stdnum.exceptions import ValidationError
from stdnum.in_ import gstin
from stdnum.ru import inn
from stdnum.tr import vkn

from billing.errors import TaxIdInvalid

_STDNUM: dict[str, ModuleType] = {"CN": uscc, "RU": inn, "BY": unp, "IN": gstin, "TR": vkn, "EG": tn}
# EU member states: the VAT number with its checksum (python-stdnum's per-country rules, via
# stdnum.eu.vat); Greece's VAT prefix is EL.
EU_MEMBER_STATES = frozenset(
    [
        "AT",
        "BE",
        "BG",
        "CY",
        "CZ",
        "DE",
        "DK",
        "EE",
        "ES",
        "FI",
        "FR",
        "GR",
        "HR",
        "HU",
        "IE",
        "IT",
        "LT",
        "LU",
        "LV",
        "MT",
        "NL",
        "PL",
        "PT",
        "RO",
        "SE",
        "SI",
        "SK",
    ]
)


def _eu(country: str, number: str) -> str:
    prefix = "EL" if country == "GR" else country
    value = number[2:] if number.startswith(prefix) and not number[2:3].isalpha() else number
    return str(eu_vat.validate(prefix + value))[2:]


def _kz_check_digit(digits: str) -> int | None:
    for weights in (range(1, 12), (3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2)):
        check = sum(int(d) * w for d, w in zip(digits[:11], weights, strict=True)) % 11
        if check != 10:
            return check
    return None


def _kz(number: str) -> str | None:
    if not re.fullmatch(r"\d{12}", number):
        return "a BIN/IIN has 12 digits"
    if _kz_check_digit(number) != int(number[11]):
        return "check digit does not match"
    return None


def _digits(count: int, pattern: str | None = None, what: str = "") -> Callable[[str], str | None]:
    def check(number: str) -> str | None:
        if not re.fullmatch(rf"\d{{{count}}}", number):
            return f"{what or 'the number'} has {count} digits"
        if pattern and not re.fullmatch(pattern, number):
            return f"{what or 'the number'} must match {pattern}"
        return None

    return check


def _pk(number: str) -> str | None:
    if re.fullmatch(r"\d{7}[0-9A-Z]?", number) or re.fullmatch(r"\d{13}", number):
        return None
    return "an NTN has 7 digits and a check character, a CNIC 13 digits"


_OWN: dict[str, Callable[[str], str | None]] = {
    "KZ": _kz,
    "SA": _digits(15, r"3\d{13}3", "a KSA VAT number"),
    "AE": _digits(15, r"100\d{12}", "a UAE TRN"),
    "UZ": _digits(9, None, "a STIR"),
    "KG": _digits(14, None, "a KG INN"),
    "TJ": _digits(9, None, "a TJ INN"),
    "PK": _pk,
}


def compact(country: str, tax_id: str) -> str:
    """Upper case, separators removed, ISO country prefix stripped."""
    value = re.sub(r"[\s.\-/]", "", tax_id).upper()
    if value.startswith(country.upper()) and len(value) > 2 and value[2:3].isdigit():
        value = value[2:]
    return value


def validate(country: str, tax_id: str) -> str:
    """Normalized tax id for ``country`` (ISO 3166 alpha-2), or raise TaxIdInvalid."""
    cc = country.upper()
    value = compact(cc, tax_id)
    if not value:
        raise TaxIdInvalid(cc, tax_id, "empty")
    if cc in EU_MEMBER_STATES:
        try:
            return _eu(cc, value)
        except ValidationError as exc:
            raise TaxIdInvalid(cc, tax_id, f"EU VAT number: {exc}") from exc
    module = _STDNUM.get(cc)
    if module is not None:
        try:
            return str(module.validate(value))
        except ValidationError as exc:
            raise TaxIdInvalid(cc, tax_id, f"{module.__name__}: {exc}") from exc
    own = _OWN.get(cc)
    problem = (
        own(value)
        if own
        else (None if re.fullmatch(r"[0-9A-Z]{4,20}", value) else "expected 4-20 letters or digits")
    )
    if problem:
        raise TaxIdInvalid(cc, tax_id, problem)
    return value


def with_prefix(country: str, normalized: str) -> str:
    """The id with its ISO 3166 prefix, as EN 16931 BR-CO-09 wants for VAT identifiers."""
    return normalized if normalized.startswith(country) else f"{country}{normalized}"
