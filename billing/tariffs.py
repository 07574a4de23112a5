"""Tariffs: what one billed unit of a usage event is (the price book's `tariff`, billing/price_book.py).

- ``tokens`` (the default): the tokens as metered.
- ``english_equivalent``: tokens ÷ the premium of the event's language on the model's tokenizer
  (configs/billing/language_premiums.csv, metering/language_premiums.py: versioned, dated rows with
  their source; the row in force is the latest measured on or before the event's day). A Kazakh
  sentence that costs 4.45x the tokens of its English translation on SmolLM2's tokenizer is billed
  the English sentence's units. An event without a detected language, or a language or model without
  a measured premium, is billed at factor 1 (its line says so: `factor` null).
- ``per_character``: the characters of the prompt and of the completion (the event's text-size
  fields), never the text: `input`/`cached_input` share the prompt's characters in the proportion of
  their tokens, `output` is the completion's, `embedding_input` the input's. An event recorded
  before the text sizes existed is billed in tokens (its line says `unit: token`).

Each event is converted on its own and kept exact; an invoice line rounds its sum once (half up) to
whole units. The billing slice, the budget guard and the spend metric all call `billed_units`, so a
budget counts the units the invoice bills (exact, to the budget's millionth of the currency).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from billing.errors import ConfigError
from billing.price_book import PriceBook, Tariff
from metering.events import TokenType, UsageEvent
from metering.language_premiums import Premium, PremiumFileError, PremiumTable, load_premiums

UNIT_TOKEN = "token"
UNIT_EE_TOKEN = "english_equivalent_token"
UNIT_CHARACTER = "character"
# A budget hold is taken before the answer exists: under per_character it counts this many characters
# per token (English text averages about 4 on the tokenizers measured here; whitespace runs and long
# words go higher), under english_equivalent tokens ÷ the smallest premium of the model (a language
# denser than English bills more units than tokens: Chinese on Qwen's tokenizer, 0.86).
HOLD_CHARS_PER_TOKEN = 8


@dataclass(frozen=True, slots=True)
class Billed:
    """One token type of one event, as billed: `exact` units in `unit` (tokens ÷ premium is not a
    whole number: it is kept exact and rounded once, on the invoice line), from `raw_tokens` with
    `factor` (the premium divided by; None: no premium applied)."""

    exact: Decimal
    raw_tokens: int
    unit: str
    factor: Decimal | None = None
    factor_source: str | None = None  # the premium row used: "<measured_on> <tokenizer>: <source>"

    @property
    def units(self) -> int:
        """Rounded half up (where a whole number is needed: tier positions, day shares)."""
        return half_up(self.exact)


def load_premium_table(path: Path) -> PremiumTable | None:
    """The premiums file, or None when there is none (then english_equivalent bills at factor 1)."""
    if not path.exists():
        return None
    try:
        return load_premiums(path)
    except PremiumFileError as exc:
        raise ConfigError(exc.file, f"line {exc.line}: {exc.field}", exc.reason) from exc


def half_up(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def premium_of(premiums: PremiumTable | None, language: str | None, model: str, on: date) -> Premium | None:
    if premiums is None or not language or language == "und":
        return None
    row = premiums.lookup(language, model, on)
    return row if row is not None and row.premium > 0 else None


def _shares(event: UsageEvent, tokens: Mapping[TokenType, int]) -> dict[TokenType, int] | None:
    """The characters behind each token type, or None when the event has no text sizes."""
    if event.prompt_chars is None or event.completion_chars is None:
        return None
    prompt = event.prompt_chars
    out: dict[TokenType, int] = {}
    cached = tokens.get(TokenType.CACHED_INPUT, 0)
    fresh = tokens.get(TokenType.INPUT, 0)
    if cached and fresh + cached:
        out[TokenType.CACHED_INPUT] = half_up(Decimal(prompt) * cached / (fresh + cached))
    if fresh:
        out[TokenType.INPUT] = prompt - out.get(TokenType.CACHED_INPUT, 0)
    if TokenType.EMBEDDING_INPUT in tokens:
        out[TokenType.EMBEDDING_INPUT] = prompt
    if TokenType.OUTPUT in tokens:
        out[TokenType.OUTPUT] = event.completion_chars
    return out


def billed_units(
    tariff: Tariff, premiums: PremiumTable | None, event: UsageEvent, day: date | None = None
) -> dict[TokenType, Billed]:
    """Each token type of `event` with tokens, as billed under `tariff`."""
    tokens = {t: n for t, n in event.tokens_by_type().items() if n}
    if tariff is Tariff.TOKENS:
        return {t: Billed(Decimal(n), n, UNIT_TOKEN) for t, n in tokens.items()}
    if tariff is Tariff.ENGLISH_EQUIVALENT:
        row = premium_of(premiums, event.language, event.model, day or event.started_at.date())
        if row is None:
            return {t: Billed(Decimal(n), n, UNIT_EE_TOKEN) for t, n in tokens.items()}
        ref = f"{row.measured_on.isoformat()} {row.tokenizer}: {row.source}"
        return {
            t: Billed(Decimal(n) / row.premium, n, UNIT_EE_TOKEN, row.premium, ref) for t, n in tokens.items()
        }
    chars = _shares(event, tokens)
    if chars is None:
        return {t: Billed(Decimal(n), n, UNIT_TOKEN) for t, n in tokens.items()}
    return {t: Billed(Decimal(chars.get(t, 0)), n, UNIT_CHARACTER) for t, n in tokens.items()}


class Converter:
    """One tenant's events as billed: the tariff of the price book version (or contract) in force on
    each event's day, in the tenant's currency; None for an event on the tokens tariff."""

    def __init__(self, book: PriceBook, premiums: PremiumTable | None, tenant_id: str, currency: str) -> None:
        self.book, self.premiums, self.tenant_id, self.currency = book, premiums, tenant_id, currency
        self._tariffs: dict[date, Tariff] = {}
        self._most_units: dict[str, Decimal] = {}  # model -> 1 / its smallest premium (>= 1)

    def tariff_on(self, day: date) -> Tariff:
        found = self._tariffs.get(day)
        if found is None:
            found = self._tariffs[day] = self.book.tariff(
                currency=self.currency, day=day, tenant_id=self.tenant_id
            )
        return found

    def __call__(self, event: UsageEvent) -> dict[TokenType, Billed] | None:
        day = event.started_at.date()
        tariff = self.tariff_on(day)
        return None if tariff is Tariff.TOKENS else billed_units(tariff, self.premiums, event, day)

    def hold_factor(self, model: str, day: date) -> Decimal:
        """How many billed units a token may become for this tenant that day (>= 1): budget holds."""
        tariff = self.tariff_on(day)
        if tariff is Tariff.PER_CHARACTER:
            return Decimal(HOLD_CHARS_PER_TOKEN)
        if tariff is Tariff.ENGLISH_EQUIVALENT and self.premiums is not None:
            found = self._most_units.get(model)
            if found is None:  # once per model (this runs on every admission of a money budget)
                mine = [r.premium for r in self.premiums.rows if r.tokenizer == model and r.premium > 0]
                found = self._most_units[model] = max(Decimal(1), 1 / min(mine)) if mine else Decimal(1)
            return found
        return Decimal(1)
