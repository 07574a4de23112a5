"""Bidi isolation of data inside documents: numbers, IBANs, tax ids, document numbers and Latin names
keep their own direction inside right-to-left (Arabic) pages, so "2750 0001 0002" never prints as
"0002 0001 2750". WeasyPrint honours ``<bdi dir=...>`` (an isolate with an explicit direction), not
``dir=auto``, so the direction is computed here, as HTML's ``dir=auto`` would."""

from __future__ import annotations

import unicodedata

from markupsafe import Markup, escape

_RTL_CLASSES = frozenset({"R", "AL"})


def text_direction(text: str) -> str:
    """``rtl`` or ``ltr`` from the first strong character; ``ltr`` when there is none (numbers)."""
    for char in text:
        kind = unicodedata.bidirectional(char)
        if kind in _RTL_CLASSES:
            return "rtl"
        if kind == "L":
            return "ltr"
    return "ltr"


def isolate(value: object) -> Markup:
    """``value`` (escaped) as ``<bdi dir="ltr|rtl">``: its own direction, isolated from the text around."""
    text = "" if value is None else str(value)
    return Markup('<bdi dir="{}">{}</bdi>').format(text_direction(text), escape(text))


def ltr(value: object) -> Markup:
    """A number, amount or percentage as a left-to-right isolate: CLDR's Arabic formats start with a
    right-to-left mark ("\u200f30.00 US$"), which inside a right-to-left run prints as "$US 30.00";
    as a left-to-right isolate it prints "30.00 US$" (and "337.54 ر.س." keeps its own order)."""
    text = "" if value is None else str(value)
    return Markup('<bdi dir="ltr">{}</bdi>').format(escape(text))


def fill(template: str, **values: object) -> Markup:
    """``template`` (a catalogue text with ``{name}`` fields), escaped, with each value inserted as an
    isolate: "هذا المستند ملغى بموجب إشعار الدائن {reference}" keeps "TP-CRN-2026-000001" whole."""
    return escape(template).format(**{name: isolate(value) for name, value in values.items()})
