"""billing.prices: one PriceSource read from one path, errors kept, refreshed only when the file changed."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pytest

from billing.errors import ConfigError
from billing.price_book import load
from billing.prices import PriceSource, load_price_source
from metering.events import TokenType
from serving.limits.pricing import PriceBookPricer, PriceUnavailable

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "billing" / "price_books.yaml"


def test_a_missing_or_invalid_file_is_kept_as_the_error(tmp_path: Path) -> None:
    missing = load_price_source(tmp_path / "nope.yaml")
    assert not missing.available
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        missing.book()
    pricer = PriceBookPricer(missing)  # money budgets then refuse (fail closed), never price at zero
    with pytest.raises(PriceUnavailable, match="cannot read"):
        pricer.price("smollm2-135m-instruct", TokenType.INPUT, 10, "USD")


def test_refresh_rereads_only_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "price_books.yaml"
    shutil.copy(SHIPPED, path)
    source = load_price_source(path)
    first = source.book()
    source.refresh()
    assert source.book() is first  # unchanged file: the same object (caches keyed on it stay valid)
    path.write_text("price_books: [\n", encoding="utf-8")
    assert source.book() is first  # nothing re-read until asked
    source.refresh()
    with pytest.raises(ConfigError, match="not valid YAML"):
        source.book()
    shutil.copy(SHIPPED, path)
    source.refresh()
    assert source.available and source.book() is not first


def test_budget_pricer_follows_the_shared_source(tmp_path: Path) -> None:
    path = tmp_path / "price_books.yaml"
    shutil.copy(SHIPPED, path)
    source = load_price_source(path)
    pricer = PriceBookPricer(source)
    on = date(2026, 3, 5)
    before = pricer.price("smollm2-135m-instruct", TokenType.INPUT, 1_000_000, "USD", on=on)
    path.write_text(
        path.read_text(encoding="utf-8").replace('input: "0.020"', 'input: "0.500"'), encoding="utf-8"
    )
    assert pricer.price("smollm2-135m-instruct", TokenType.INPUT, 1_000_000, "USD", on=on) == before
    source.refresh()
    assert str(pricer.price("smollm2-135m-instruct", TokenType.INPUT, 1_000_000, "USD", on=on)) == "0.500"


def test_a_fixed_source_never_rereads() -> None:
    book = load(SHIPPED)
    source = PriceSource.of(book)
    source.refresh()
    assert source.book() is book and source.error is None
