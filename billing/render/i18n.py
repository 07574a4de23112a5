"""The label catalogue (templates/messages.yaml), tax wording (templates/tax_wording.yaml) and Babel
formatting for one language.

Document languages: en, zh, ru, ar, kk (Kazakh, Cyrillic), uz (Uzbek, Latin script: Babel's
``uz_Latn``) and tr. Another language Babel knows gets its own number/date formats with English
labels; an unknown one falls back to English.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any, cast

import yaml
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency, format_decimal, format_percent

FALLBACK = "en"
# A language code -> the CLDR locale its documents are formatted in (the script the labels use).
LOCALES = {"uz": "uz_Latn", "kk": "kk_Cyrl"}


def _yaml(name: str) -> Any:
    text = resources.files("billing.render.templates").joinpath(name).read_text(encoding="utf-8")
    return yaml.safe_load(text)


@lru_cache(maxsize=1)
def catalogue() -> dict[str, dict[str, str]]:
    return cast(dict[str, dict[str, str]], _yaml("messages.yaml"))


@lru_cache(maxsize=1)
def tax_wording() -> dict[str, dict[str, str]]:
    """treatment -> language -> text with ``{country}`` and ``{rate}`` placeholders."""
    return cast(dict[str, dict[str, str]], _yaml("tax_wording.yaml"))


def languages() -> tuple[str, ...]:
    return tuple(catalogue())


@dataclass(frozen=True, slots=True)
class Localizer:
    """Labels and number/date/currency formatting for one language (Babel/CLDR)."""

    language: str
    locale: Locale

    @classmethod
    def for_language(cls, language: str | None) -> Localizer:
        code = (language or FALLBACK).replace("-", "_")
        base = code.split("_")[0].lower()
        for candidate in (LOCALES.get(base), code):
            if candidate is None:
                continue
            try:
                return cls(base, Locale.parse(candidate))
            except (UnknownLocaleError, ValueError):
                continue
        return cls(FALLBACK, Locale.parse(FALLBACK))

    @property
    def direction(self) -> str:
        return "rtl" if self.locale.text_direction == "rtl" else "ltr"

    def t(self, key: str, **values: Any) -> str:
        table = catalogue()
        text = table.get(self.language, {}).get(key) or table[FALLBACK].get(key, key)
        return text.format(**values) if values else text

    def has(self, key: str) -> bool:
        return key in catalogue()[FALLBACK]

    def tax_text(
        self, treatment: str, wording: Mapping[str, str], note: str, *, country: str, rate: Decimal | None
    ) -> str:
        """The tax wording in this language: the document's own (stored at issue) when it has this
        language, else the catalogue's for the treatment, else the document's English note."""
        if own := wording.get(self.language):
            return own
        texts = tax_wording().get(treatment, {})
        if template := texts.get(self.language):
            rate_text = "-" if rate is None else format(rate.normalize(), "f")
            return template.format(country=country, rate=rate_text)
        return note

    def money(self, value: Decimal, currency: str) -> str:
        return str(format_currency(value, currency, locale=self.locale, decimal_quantization=False))

    def price(self, value: Decimal, currency: str) -> str:
        """A unit price with all its significant decimals (at least 2)."""
        shown = value.normalize()
        exponent = shown.as_tuple().exponent
        if isinstance(exponent, int) and exponent > -2:
            shown = shown.quantize(Decimal("0.01"))
        return str(format_currency(shown, currency, locale=self.locale, decimal_quantization=False))

    def number(self, value: int | Decimal) -> str:
        return str(format_decimal(value, locale=self.locale, decimal_quantization=False))

    def percent(self, value: Decimal) -> str:
        """``value`` in percent (16 -> "16%", tr "%16", ru "16 %")."""
        return str(format_percent(value.normalize() / 100, locale=self.locale, decimal_quantization=False))

    def date(self, value: date) -> str:
        return str(format_date(value, format="long", locale=self.locale))

    def country(self, code: str) -> str:
        return str(self.locale.territories.get(code, code))
