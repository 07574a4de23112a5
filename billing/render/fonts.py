"""Fonts for PDF documents: rendering fails loudly, naming the script, the font and the Debian
package, when a character would otherwise print as a box (.notdef glyph).

The check reads what WeasyPrint actually drew: every glyph Pango could not find in any installed font
is recorded on WeasyPrint's PDF font object (``Font.missing``, code point -> glyph id). Documents in
en, zh, ru, ar, kk, uz and tr need Noto Sans (Latin, Cyrillic incl. Kazakh), Noto Sans CJK SC (the
seller's Chinese name is on every document) and Noto Sans Arabic: Debian's fonts-noto-core and
fonts-noto-cjk (``.ci/runtime-deps.sh``, run by ``make run``, installs them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from billing.errors import BillingError

INSTALL_HINT = "Install them (`make fonts` or `bash .ci/runtime-deps.sh`; Debian: apt-get install {packages})"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    font: str  # the CSS font-family of the document's stack that covers it
    package: str  # the Debian package shipping that font
    ranges: tuple[tuple[int, int], ...]

    def covers(self, codepoint: int) -> bool:
        return any(low <= codepoint <= high for low, high in self.ranges)


SCRIPTS = (
    Script(
        "Arabic",
        "Noto Sans Arabic",
        "fonts-noto-core",
        ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    ),
    Script(
        "CJK",
        "Noto Sans CJK SC",
        "fonts-noto-cjk",
        ((0x2E80, 0x9FFF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x20000, 0x3FFFF)),
    ),
    Script("Cyrillic", "Noto Sans", "fonts-noto-core", ((0x0400, 0x052F), (0x1C80, 0x1C8F))),
)
OTHER = Script("Latin and other", "Noto Sans", "fonts-noto-core", ())


def script_of(codepoint: int) -> Script:
    return next((s for s in SCRIPTS if s.covers(codepoint)), OTHER)


class MissingFonts(BillingError):
    """A document needs characters no installed font has (they would print as boxes)."""

    def __init__(self, missing: Iterable[int]) -> None:
        self.codepoints = tuple(sorted(set(missing)))
        by_script: dict[Script, list[int]] = {}
        for cp in self.codepoints:
            by_script.setdefault(script_of(cp), []).append(cp)
        parts = []
        for script, cps in by_script.items():
            sample = " ".join(f"U+{cp:04X} {chr(cp)!r}" for cp in cps[:6])
            more = f" and {len(cps) - 6} more" if len(cps) > 6 else ""
            parts.append(f"{script.name} ({sample}{more}) needs the font '{script.font}' ({script.package})")
        packages = " ".join(sorted({s.package for s in by_script}))
        self.scripts = tuple(s.name for s in by_script)
        self.packages = tuple(packages.split())
        super().__init__(
            "cannot render the PDF: no installed font has these characters, they would print as boxes: "
            + "; ".join(parts)
            + ". "
            + INSTALL_HINT.format(packages=packages)
        )


def missing_codepoints(fonts: Mapping[object, object]) -> set[int]:
    """The code points WeasyPrint drew as .notdef, from a rendered ``Document.fonts``."""
    missing: set[int] = set()
    for font in fonts.values():
        missing.update(int(cp) for cp in getattr(font, "missing", {}) or {})
    return missing


def check_drawn(fonts: Mapping[object, object]) -> None:
    """Raise MissingFonts if WeasyPrint drew any character without a font for it."""
    if missing := missing_codepoints(fonts):
        raise MissingFonts(missing)
