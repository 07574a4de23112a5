"""The label catalogue (templates/messages.yaml) and Babel formatting for one language."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any, cast

import yaml
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency, format_decimal

FALLBACK = "en"


@lru_cache(maxsize=1)
def catalogue() -> dict[str, dict[str, str]]:
    text = resources.files("billing.render.templates").joinpath("messages.yaml").read_text(encoding="utf-8")
    return cast(dict[str, dict[str, str]], yaml.safe_load(text))


def languages() -> tuple[str, ...]:
    return tuple(catalogue())


@dataclass(frozen=True, slots=True)
class Localizer:
    """Labels and number/date/currency formatting for one language (Babel/CLDR)."""

    language: str
    locale: Locale

    @classmethod
    def for_language(cls, language: str) -> Localizer:
        lang = (language or FALLBACK).replace("-", "_")
        try:
            locale = Locale.parse(lang)
        except (UnknownLocaleError, ValueError):
            lang, locale = FALLBACK, Locale.parse(FALLBACK)
        return cls(lang.split("_")[0].lower(), locale)

    @property
    def direction(self) -> str:
        return "rtl" if self.locale.text_direction == "rtl" else "ltr"

    def t(self, key: str, **values: Any) -> str:
        table = catalogue()
        text = table.get(self.language, {}).get(key) or table[FALLBACK].get(key, key)
        return text.format(**values) if values else text

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
        return f"{self.number(value.normalize())} %"

    def date(self, value: date) -> str:
        return str(format_date(value, format="long", locale=self.locale))

    def country(self, code: str) -> str:
        return str(self.locale.territories.get(code, code))
