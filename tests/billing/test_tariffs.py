"""Fair tariffs (issue 15): a price book or contract prices per English-equivalent token or per
character; invoices show raw tokens, the factor and the billed units per language; budgets and the
spend metric count the same units.

The acceptance test tokenizes the project's parallel corpus (metering/data) in Kazakh and English with
SmolLM2's real tokenizer (the model folder `make test` prepares) and bills it with the premiums of
configs/billing/language_premiums.csv measured for that tokenizer."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from month_world import ROOT, World, invoice_of, make_world
from tokenizers import Tokenizer

from billing.documents import Invoice, InvoiceLine
from billing.errors import ConfigError
from billing.price_book import Tariff
from billing.price_book import load as load_book
from billing.prices import load_price_source
from billing.tariffs import UNIT_CHARACTER, UNIT_EE_TOKEN, UNIT_TOKEN, billed_units
from metering.clock import Period
from metering.events import Outcome, TokenType, UsageEvent
from metering.language_premiums import load_premiums
from metering.tokentax import load_corpus
from serving.limits.pricing import PriceBookPricer, billed_counts, cost_units

MODEL = "smollm2-135m-instruct"
DEC = Period(2026, 12)
DAY = date(2026, 12, 10)  # after the premiums' measured_on (2026-12-03)
TOKENIZER = ROOT / "data" / "models" / MODEL / "tokenizer.json"


def book(tariff: str | None, contract_tariff: str | None = None) -> dict[str, Any]:
    usd: dict[str, Any] = {
        "models": {MODEL: {"input": "1000.00", "cached_input": "500.00", "output": "2000.00"}}
    }
    if tariff:
        usd["tariff"] = tariff
    contract: dict[str, Any] = {
        "id": "kz-fair",
        "tenant": "kz-bank",
        "currency": "USD",
        "effective_from": "2026-01-01",
    }
    if contract_tariff:
        contract["tariff"] = contract_tariff
    return {
        "price_books": [{"version": "2026.12", "effective_from": "2026-01-01", "currencies": {"USD": usd}}],
        "contracts": [contract],
    }


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def use(
    w: World,
    language: str | None,
    prompt: int,
    completion: int = 0,
    chars: tuple[int, int] | None = None,
    *,
    origin: str = "KZ",
    day: date = DAY,
) -> UsageEvent:
    when = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    e = UsageEvent(
        request_id="req_" + uuid.uuid4().hex,
        tenant_id="kz-bank",
        key_id="key_t",
        model=MODEL,
        origin_country=origin,
        prompt_tokens=prompt,
        cached_prompt_tokens=0,
        completion_tokens=completion,
        stream=False,
        outcome=Outcome.OK,
        started_at=when,
        finished_at=when,
        language=language,
        prompt_chars=None if chars is None else chars[0],
        prompt_bytes=None if chars is None else chars[0],
        completion_chars=None if chars is None else chars[1],
        completion_bytes=None if chars is None else chars[1],
    )
    assert w.usage.append_batch([e]) == [e.request_id]
    return e


def invoice(w: World, tariff: str | None = None, contract_tariff: str | None = None) -> Invoice:
    (w.config_dir / "price_books.yaml").write_text(yaml.safe_dump(book(tariff, contract_tariff)), "utf-8")
    w.clock.now = datetime(2027, 1, 2, 9, tzinfo=UTC)
    [row] = w.svc.run(DEC, tenant_id="kz-bank").drafts
    got: Invoice = invoice_of(w, row.ref)
    return got


def by_language(inv: Invoice) -> dict[str | None, InvoiceLine]:
    return {line.language: line for line in inv.lines if line.token_type is TokenType.INPUT}


def test_kazakh_and_english_parallel_sentences_cost_the_same_on_an_english_equivalent_contract(
    world: World,
) -> None:
    tok = Tokenizer.from_file(str(TOKENIZER))  # SmolLM2's own tokenizer (make test prepares the model)
    corpus = load_corpus()
    sentences = [s for s in corpus.sentences if "kk" in s.texts and "en" in s.texts]
    assert len(sentences) >= 30
    raw = {"kk": 0, "en": 0}
    for s in sentences:  # one request per sentence and language
        for lang in raw:
            n = len(tok.encode(s.texts[lang], add_special_tokens=False).ids)
            raw[lang] += n
            use(world, lang, n)
    premium = load_premiums(world.config_dir / "language_premiums.csv").lookup("kk", MODEL, DAY)
    assert premium is not None and premium.premium > 4  # Kazakh costs over 4x English on this tokenizer

    lines = by_language(invoice(world, contract_tariff="english_equivalent"))  # opt-in per contract
    kk, en = lines["kk"], lines["en"]
    assert (kk.raw_tokens, en.raw_tokens) == (raw["kk"], raw["en"])
    assert (
        kk.unit == en.unit == UNIT_EE_TOKEN and kk.factor == premium.premium and en.factor == Decimal("1.000")
    )
    # the same meaning, the same bill: the same units (each line rounds its exact sum once) and cents
    assert abs(kk.quantity_tokens - en.quantity_tokens) <= 1
    assert kk.amount == en.amount and kk.amount > Decimal("0.40"), (kk, en)

    # the default (tokens) tariff: the Kazakh buyer pays the token tax
    default = by_language(invoice(world))
    assert set(default) == {None}  # one line, no language split, no tariff fields
    plain = default[None]
    assert plain.unit is None and plain.quantity_tokens == raw["kk"] + raw["en"]
    assert plain.amount > 5 * kk.amount  # 2.86 USD for the pair instead of 1.05
    assert "unit" not in plain.to_json_dict()


def test_the_invoice_json_states_raw_tokens_factor_and_billed_units(world: World) -> None:
    use(world, "kk", 4454)
    use(world, None, 1000)  # no detected language: factor 1, said so
    use(world, "xx", 10)  # a language without a measured premium
    inv = invoice(world, tariff="english_equivalent")  # on the book: every tenant in USD
    lines = by_language(inv)
    assert lines["kk"].to_json_dict() | {} == lines["kk"].to_json_dict()
    got = lines["kk"].to_json_dict()
    assert (got["unit"], got["language"], got["raw_tokens"], got["billed_units"]) == (
        UNIT_EE_TOKEN,
        "kk",
        4454,
        1000,
    )
    assert got["factor"] == "4.454" and got["quantity_tokens"] == 1000
    assert got["factor_source"].startswith("2026-12-03 smollm2-135m-instruct: tokenport languages measure")
    assert lines["und"].factor is None and lines["und"].quantity_tokens == lines["und"].raw_tokens == 1000
    assert lines["xx"].factor is None and lines["xx"].quantity_tokens == 10
    again = Invoice.from_json_dict(inv.to_json_dict())
    assert again.lines == inv.lines  # the fields survive the stored JSON


def test_per_character_prices_the_text_size_and_old_events_fall_back_to_tokens(world: World) -> None:
    use(world, "zh", 30, 40, chars=(45, 60))
    use(world, "en", 30, 40, chars=(140, 180))
    use(world, "ru", 25, 5)  # recorded before the text sizes: billed in tokens, said so
    inv = invoice(world, contract_tariff="per_character")
    out = {(line.language, line.token_type): line for line in inv.lines}
    zh_in, en_out = out[("zh", TokenType.INPUT)], out[("en", TokenType.OUTPUT)]
    assert (zh_in.unit, zh_in.quantity_tokens, zh_in.raw_tokens) == (UNIT_CHARACTER, 45, 30)
    assert (en_out.unit, en_out.quantity_tokens, en_out.raw_tokens) == (UNIT_CHARACTER, 180, 40)
    ru = out[("ru", TokenType.INPUT)]
    assert (ru.unit, ru.quantity_tokens) == (UNIT_TOKEN, 25)
    # 45 characters x 1000.00 per 1M characters
    assert zh_in.amount_unrounded == Decimal("0.045")


def test_cached_input_shares_the_prompts_characters() -> None:
    e = UsageEvent(
        request_id="r",
        tenant_id="t",
        key_id="k",
        model=MODEL,
        origin_country="KZ",
        prompt_tokens=100,
        cached_prompt_tokens=25,
        completion_tokens=0,
        stream=False,
        outcome=Outcome.OK,
        started_at=datetime(2026, 12, 10, tzinfo=UTC),
        finished_at=datetime(2026, 12, 10, tzinfo=UTC),
        prompt_chars=401,
        completion_chars=0,
    )
    got = billed_units(Tariff.PER_CHARACTER, None, e)
    assert got[TokenType.CACHED_INPUT].units == 100 and got[TokenType.INPUT].units == 301


def test_a_budget_counts_the_units_the_invoice_bills(world: World) -> None:
    """The budget guard and the spend metric convert each event as the invoice does (one conversion,
    billing/tariffs.py): with flat prices, the budget's money equals the invoice's unrounded amounts."""
    events = [
        use(world, "kk", 4454, 900, chars=(500, 90)),
        use(world, "en", 1000, 900),
        use(world, "ru", 2225),
    ]
    inv = invoice(world, contract_tariff="english_equivalent")
    pricer = PriceBookPricer(load_price_source(world.config_dir / "price_books.yaml"))
    spent = 0
    for e in events:
        fresh, cached, out = billed_counts(pricer, "kz-bank", "USD", e)
        spent += cost_units(
            pricer,
            MODEL,
            "USD",
            "kz-bank",
            input_tokens=fresh,
            cached_tokens=cached,
            output_tokens=out,
            on=DAY,
        )
    billed = sum((line.amount_unrounded for line in inv.lines), Decimal(0))
    # the budget counts the exact units; each invoice line rounds its units once (half a unit at most)
    most = Decimal(len(inv.lines)) / 2 * Decimal("2000.00") / 1_000_000
    assert abs(Decimal(spent) / 1_000_000 - billed) <= most, (spent, billed)
    tokens_cost = sum(
        cost_units(
            pricer,
            MODEL,
            "USD",
            "kz-bank",
            input_tokens=e.prompt_tokens,
            cached_tokens=0,
            output_tokens=e.completion_tokens,
            on=DAY,
        )
        for e in events
    )
    assert tokens_cost > 2 * spent  # not the raw tokens: the Kazakh ones are billed at a quarter
    convert = pricer.converter("kz-bank", "USD")
    assert convert is not None and convert.hold_factor(MODEL, DAY) >= 1


def test_an_unknown_tariff_is_refused_with_the_file_and_field(tmp_path: Path) -> None:
    bad = book("per_word")
    (tmp_path / "price_books.yaml").write_text(yaml.safe_dump(bad), "utf-8")
    with pytest.raises(ConfigError, match="tariff"):
        load_book(tmp_path / "price_books.yaml")


def test_every_format_says_what_the_billed_units_are(world: World) -> None:
    use(world, "kk", 4454)
    inv = invoice(world, contract_tariff="english_equivalent")
    world.svc.run(DEC)
    [row] = world.svc.finalize(DEC).finalized
    csv_text = world.svc.render(row.ref, "csv").decode()
    header, first = csv_text.splitlines()[:2]
    assert header.endswith("unit,language,raw_tokens,factor,reference")
    assert first.endswith(",english_equivalent_token,kk,4454,4.454,") and ",1000," in first
    assert all(len(r.split(",")) == len(header.split(",")) for r in csv_text.splitlines()[1:])
    ubl = world.svc.render(row.ref, "ubl").decode()
    assert "kk: 4454 raw tokens / premium 4.454 = billed english equivalent tokens" in ubl
    html = world.svc.render(row.ref, "html").decode()  # the tenant reads Russian
    assert "kk: 4" in html and "4.454" in html and "токены в английском эквиваленте" in html
    assert inv.lines[0].quantity_tokens == 1000


def test_a_line_rounds_once_across_origins_and_splits_by_premium_row(world: World) -> None:
    use(world, "kk", 2, origin="KZ")  # 2 / 4.454 = 0.449 units each: rounded per origin that is 0 + 0
    use(world, "kk", 2, origin="UZ")
    csv = world.config_dir / "language_premiums.csv"
    newer = '"re-measured, corpus tokenport-parallel-v2",2026-12-20'
    csv.write_text(csv.read_text("utf-8") + f"kk,{MODEL},4.000,{newer}\n", "utf-8")
    use(world, "kk", 4000, day=date(2026, 12, 21))  # billed with the newer row: its own line
    world.clock.now = datetime(2027, 1, 2, 9, tzinfo=UTC)
    inv = invoice(world, contract_tariff="english_equivalent")
    kk = sorted((line for line in inv.lines if line.language == "kk"), key=lambda line: line.factor or 0)
    assert [(line.factor, line.raw_tokens, line.quantity_tokens) for line in kk] == [
        (Decimal("4.000"), 4000, 1000),
        (Decimal("4.454"), 4, 1),  # 4 / 4.454 = 0.898: one unit, rounded once on the line
    ]
    assert kk[0].factor_source is not None and "tokenport-parallel-v2" in kk[0].factor_source
    world.svc.run(DEC)
    world.svc.finalize(DEC)
    report = world.svc.exports(DEC)  # by origin: raw tokens per country, the revenue split over them
    tokens = {g.key: g.quantity_tokens for g in report.groups}
    assert tokens == {"KZ": 4002, "UZ": 2}, tokens
    usd = [dict(g.revenue_by_currency)["USD"] for g in report.groups]
    assert sum(usd, Decimal(0)) == sum((line.amount for line in inv.lines), Decimal(0))
