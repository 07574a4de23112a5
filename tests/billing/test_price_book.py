from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.errors import ConfigError, PriceBookNotFound, PriceMissing
from billing.price_book import PriceBook, PriceSpec, Segment, Tier, TierMode, load, parse, rate
from metering.events import TokenType

JAN = dict(period_start=date(2026, 1, 1), period_end=date(2026, 1, 31))


def book(**usd_models: Any) -> dict[str, Any]:
    return {
        "price_books": [
            {"version": "t1", "effective_from": "2026-01-01", "currencies": {"USD": {"models": usd_models}}}
        ]
    }


def test_shipped_price_book_loads_and_has_the_default_model(shipped_prices: PriceBook) -> None:
    resolved = shipped_prices.select(currency="USD", tenant_id="anyone", **JAN)
    assert resolved.version == "2026.1"
    for model in ("smollm2-135m-instruct", "qwen2.5-7b-instruct"):
        for token_type in TokenType:
            if token_type is not TokenType.EMBEDDING_INPUT:
                assert resolved.price(model, token_type).tiers[0].price > 0
    assert resolved.price("smollm2-135m-embed", TokenType.EMBEDDING_INPUT).tiers[0].price == Decimal("0.005")
    cny = shipped_prices.select(currency="CNY", tenant_id="anyone", **JAN)
    assert cny.price("smollm2-135m-instruct", TokenType.OUTPUT).tiers[0].price == Decimal("0.30")
    old = shipped_prices.select(
        currency="USD", tenant_id="x", period_start=date(2025, 12, 1), period_end=date(2025, 12, 31)
    )
    assert old.version == "2025.2"


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        (
            book(m={"input": 0.5}),
            "price_books.0.currencies.USD.models.m.input.tiers.0.price",
            "quoted string",
        ),
        (book(m={"inptu": "0.5"}), "price_books.0.currencies.USD.models.m.inptu", "input"),
        (book(m={"input": "-1"}), "price_books.0.currencies.USD.models.m.input.tiers.0.price", "negative"),
        (book(m={"input": "0.0000000000001"}), "models.m.input.tiers.0.price", "12 decimals"),
        (
            book(m={"input": {"mode": "graduated", "tiers": [{"up_to": 10, "price": "1"}]}}),
            "models.m.input",
            "last tier must have up_to: null",
        ),
        (
            book(
                m={
                    "input": {
                        "mode": "volume",
                        "tiers": [
                            {"up_to": 10, "price": "1"},
                            {"up_to": 5, "price": "1"},
                            {"up_to": None, "price": "1"},
                        ],
                    }
                }
            ),
            "models.m.input",
            "increase strictly",
        ),
        (
            book(
                m={
                    "input": {
                        "mode": "volume",
                        "tiers": [{"up_to": None, "price": "1"}, {"up_to": None, "price": "1"}],
                    }
                }
            ),
            "models.m.input",
            "only the last tier",
        ),
        (
            book(
                m={
                    "input": {
                        "mode": "flat",
                        "tiers": [{"up_to": 5, "price": "1"}, {"up_to": None, "price": "1"}],
                    }
                }
            ),
            "models.m.input",
            "exactly one tier",
        ),
        (
            book(m={"input": {"mode": "banded", "tiers": [{"up_to": None, "price": "1"}]}}),
            "models.m.input.mode",
            "",
        ),
        ({"price_books": []}, "price_books", "at least 1"),
        (
            {"price_books": [{"version": "v", "effective_from": "2026-01-01", "currencies": {"XXQ": {}}}]},
            "price_books.0.currencies",
            "XXQ",
        ),
    ],
)
def test_invalid_price_books_name_the_file_and_field(data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(data, file="configs/billing/price_books.yaml")
    text = str(err.value)
    assert text.startswith("configs/billing/price_books.yaml: ")
    assert field in err.value.field, text
    assert message in text


def test_overlapping_versions_and_contracts_are_refused() -> None:
    two = {
        "price_books": [
            {"version": "a", "effective_from": "2026-01-01", "currencies": {"USD": {"models": {}}}},
            {"version": "b", "effective_from": "2026-06-01", "currencies": {"USD": {"models": {}}}},
        ]
    }
    with pytest.raises(ConfigError, match="'a' and 'b' overlap"):
        parse(two, file="pb.yaml")
    two["price_books"][0]["effective_to"] = "2026-05-31"
    assert len(parse(two).versions) == 2
    dup = {"price_books": [two["price_books"][0], dict(two["price_books"][0])]}
    with pytest.raises(ConfigError, match="duplicate version"):
        parse(dup, file="pb.yaml")
    backwards = {"price_books": [dict(two["price_books"][0], effective_to="2025-01-01")]}
    with pytest.raises(ConfigError, match="before effective_from"):
        parse(backwards, file="pb.yaml")
    contract = {"id": "c1", "tenant": "t", "currency": "USD", "effective_from": "2026-01-01"}
    with pytest.raises(ConfigError, match="overlaps contract 'c1'"):
        parse({**two, "contracts": [contract, dict(contract, id="c2")]}, file="pb.yaml")
    with pytest.raises(ConfigError, match=r"contracts.0.currency"):
        parse({**two, "contracts": [dict(contract, currency="ZZZ")]}, file="pb.yaml")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("price_books: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_selection_errors_are_explicit(shipped_prices: PriceBook) -> None:
    with pytest.raises(PriceBookNotFound, match="EUR"):
        shipped_prices.select(currency="EUR", tenant_id="t", **JAN)
    with pytest.raises(PriceBookNotFound, match="spans versions"):
        shipped_prices.select(
            currency="USD", tenant_id="t", period_start=date(2025, 12, 15), period_end=date(2026, 1, 14)
        )
    resolved = shipped_prices.select(currency="USD", tenant_id="t", **JAN)
    with pytest.raises(PriceMissing, match=r"gpt-9.*output.*2026.1"):
        resolved.price("gpt-9", TokenType.OUTPUT)


def test_graduated_tiers_price_each_part_by_its_tier() -> None:
    spec = PriceSpec(
        TierMode.GRADUATED, (Tier(100, Decimal("3")), Tier(1000, Decimal("2")), Tier(None, Decimal("1")))
    )
    assert rate(spec, 0) == []
    assert rate(spec, 100) == [Segment(1, 100, Decimal("3"))]
    assert rate(spec, 101) == [Segment(1, 100, Decimal("3")), Segment(2, 1, Decimal("2"))]
    assert rate(spec, 2500) == [
        Segment(1, 100, Decimal("3")),
        Segment(2, 900, Decimal("2")),
        Segment(3, 1500, Decimal("1")),
    ]


def test_volume_tiers_price_everything_by_the_total() -> None:
    spec = PriceSpec(
        TierMode.VOLUME, (Tier(100, Decimal("3")), Tier(1000, Decimal("2")), Tier(None, Decimal("1")))
    )
    assert rate(spec, 100) == [Segment(1, 100, Decimal("3"))]  # up_to is inclusive
    assert rate(spec, 101) == [Segment(2, 101, Decimal("2"))]
    assert rate(spec, 2500) == [Segment(3, 2500, Decimal("1"))]


def test_shipped_tiers_hand_computed(shipped_prices: PriceBook) -> None:
    prices = shipped_prices.select(currency="USD", tenant_id="t", **JAN)
    # qwen input graduated: 100M at 0.30 + 50M at 0.24 = 30.00 + 12.00
    segments = rate(prices.price("qwen2.5-7b-instruct", TokenType.INPUT), 150_000_000)
    assert sum(s.quantity * s.unit_price for s in segments) / 1_000_000 == Decimal("42.00")
    # qwen output volume: 60M falls in tier 2 (<= 500M) -> all at 0.80 = 48.00
    segments = rate(prices.price("qwen2.5-7b-instruct", TokenType.OUTPUT), 60_000_000)
    assert segments == [Segment(2, 60_000_000, Decimal("0.80"))]


def test_contract_overrides_prices_and_minimum(shipped_prices: PriceBook) -> None:
    base = shipped_prices.select(currency="USD", tenant_id="t-other", **JAN)
    mine = shipped_prices.select(currency="USD", tenant_id="t-sample-enterprise", **JAN)
    assert base.contract_id is None and base.minimum_commitment is None
    assert mine.contract_id == "sample-enterprise-2026"
    assert mine.minimum_commitment == Decimal("500.00")
    assert mine.price("qwen2.5-7b-instruct", TokenType.OUTPUT) == PriceSpec(
        TierMode.FLAT, (Tier(None, Decimal("0.75")),)
    )
    # not overridden: the book's price
    assert mine.price("qwen2.5-7b-instruct", TokenType.INPUT) == base.price(
        "qwen2.5-7b-instruct", TokenType.INPUT
    )
    # a contract in another currency does not apply
    cny = shipped_prices.select(currency="CNY", tenant_id="t-sample-enterprise", **JAN)
    assert cny.contract_id is None


tiers = st.lists(st.integers(1, 10_000), min_size=1, max_size=4, unique=True).map(sorted)


@given(
    bounds=tiers,
    prices=st.lists(st.integers(0, 1000), min_size=5, max_size=5),
    quantity=st.integers(0, 50_000),
)
def test_graduated_equals_sum_of_marginal_prices(bounds: list[int], prices: list[int], quantity: int) -> None:
    spec = PriceSpec(
        TierMode.GRADUATED,
        (
            *(Tier(b, Decimal(p)) for b, p in zip(bounds, prices, strict=False)),
            Tier(None, Decimal(prices[-1])),
        ),
    )
    segments = rate(spec, quantity)
    assert sum(s.quantity for s in segments) == quantity

    def marginal(token: int) -> Decimal:  # price of the token-th token (1-based)
        return next(t.price for t in spec.tiers if t.up_to is None or token <= t.up_to)

    # compare against a per-tier count (cheap closed form of the per-token sum)
    expected = Decimal(0)
    lower = 0
    for t in spec.tiers:
        upper = quantity if t.up_to is None else min(quantity, t.up_to)
        expected += max(0, upper - lower) * t.price
        lower = t.up_to or lower
    assert sum(s.quantity * s.unit_price for s in segments) == expected
    if quantity:
        assert segments[-1].unit_price == marginal(quantity)


@given(bounds=tiers, quantity=st.integers(1, 50_000))
def test_volume_uses_one_tier_for_everything(bounds: list[int], quantity: int) -> None:
    spec = PriceSpec(
        TierMode.VOLUME,
        (*(Tier(b, Decimal(i)) for i, b in enumerate(bounds, 1)), Tier(None, Decimal(99))),
    )
    [segment] = rate(spec, quantity)
    assert segment.quantity == quantity
    tier = spec.tiers[segment.tier - 1]  # type: ignore[operator]
    assert tier.up_to is None or quantity <= tier.up_to
    if segment.tier and segment.tier > 1:
        assert quantity > spec.tiers[segment.tier - 2].up_to  # type: ignore[operator]


def test_batch_discount_per_book_and_contract(shipped_prices: PriceBook) -> None:
    data = book(m={"input": "0.30"})
    data["price_books"][0]["currencies"]["USD"]["batch_discount"] = "0.5"
    data["contracts"] = [
        {
            "id": "c",
            "tenant": "t-c",
            "currency": "USD",
            "effective_from": "2026-01-01",
            "batch_discount": "0.25",
            "models": {},
        }
    ]
    parsed = parse(data)
    assert parsed.select(currency="USD", tenant_id="t-x", **JAN).batch_price(Decimal("0.30")) == Decimal(
        "0.15"
    )
    assert parsed.select(currency="USD", tenant_id="t-c", **JAN).batch_price(Decimal("0.30")) == Decimal(
        "0.225"
    )
    assert parse(book(m={"input": "0.30"})).select(currency="USD", tenant_id="t", **JAN).batch_discount == 0
    assert shipped_prices.select(currency="USD", tenant_id="t", **JAN).batch_discount == Decimal("0.5")
    for bad in ("1", "-0.1", "1.5"):
        data["price_books"][0]["currencies"]["USD"]["batch_discount"] = bad
        with pytest.raises(ConfigError, match="batch_discount"):
            parse(data)
