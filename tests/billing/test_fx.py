import calendar
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from billing.errors import FxImportError, FxRateMissing
from billing.fx import FxDateRule, FxRate, FxTable, fx_date, import_csv, load_csv

CSV = """# test rates
date,base,quote,rate,source
2026-01-31,USD,SAR,3.7500,test:SAMA
2026-01-01,USD,CNY,7.1000,test:PBOC
2026-01-31,USD,CNY,7.0800,test:PBOC
"""


def test_import_csv_reads_rows_with_source_and_date() -> None:
    rates = import_csv(CSV)
    assert rates[0] == FxRate(date(2026, 1, 31), "USD", "SAR", Decimal("3.7500"), "test:SAMA")
    assert len(rates) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("date,base,quote,rate\n2026-01-01,USD,CNY,7.1\n", "header must be date,base,quote,rate,source"),
        ("date,base,quote,rate,source\n2026-13-01,USD,CNY,7.1,x\n", "rates.csv: line 2: date: month"),
        (
            "date,base,quote,rate,source\n2026-01-01,USD,CNY,-7.1,x\n",
            "line 2: rate: rate -7.1 must be a positive number",
        ),
        ("date,base,quote,rate,source\n2026-01-01,USD,CNY,1E+400,x\n", "line 2: rate: .* outside"),
        (
            "date,base,quote,rate,source\n2026-01-01,USD,USD,2,x\n",
            "line 2: rate: base and quote are both USD",
        ),
        (
            "# c\ndate,base,quote,rate,source\n\n2026-01-01,USD,CNY,7.1,x,extra\n",
            "line 4: 6 fields, expected 5",
        ),
        (
            "date,base,quote,rate,source\n2026-01-01,USD,CNY,7.1,a\n2026-01-01,CNY,USD,0.2,b\n",
            "disagree: their product is 1.42",
        ),
        ("date,base,quote,rate,source\n2026-01-01,USD,CNY,seven,x\n", "not a decimal"),
        ("date,base,quote,rate,source\n2026-01-01,USD,XXQ,7.1,x\n", "XXQ"),
        ("date,base,quote,rate,source\n2026-01-01,USD,CNY,7.1,\n", "source is required"),
        (
            "date,base,quote,rate,source\n2026-01-01,USD,CNY,7.1,a\n2026-01-01,USD,CNY,7.2,b\n",
            "two different USD/CNY",
        ),
    ],
)
def test_import_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(FxImportError, match=message):
        import_csv(text, origin="rates.csv")


def test_lookup_direct_inverse_cross_identity() -> None:
    table = FxTable(tuple(import_csv(CSV)))
    assert table.rate("USD", "SAR", date(2026, 1, 31)).rate == Decimal("3.7500")
    inverse = table.rate("SAR", "USD", date(2026, 1, 31))
    assert inverse.rate == Decimal("0.2666666667") and inverse.source == "inverse:test:SAMA"
    cross = table.rate("SAR", "CNY", date(2026, 1, 31))  # 7.08 / 3.75 = 1.888
    assert cross.rate == Decimal("1.8880000000")
    assert cross.source == "cross:USD(inverse:test:SAMA;test:PBOC)"
    same = table.rate("cny", "CNY", date(2030, 1, 1))
    assert same.rate == 1 and same.source == "identity"


def test_missing_rate_is_an_error_never_the_latest() -> None:
    table = FxTable(tuple(import_csv(CSV)))
    with pytest.raises(FxRateMissing, match=r"USD->SAR for 2026-01-30"):
        table.rate("USD", "SAR", date(2026, 1, 30))  # a rate exists the next day: not used
    with pytest.raises(FxRateMissing, match="EUR->CNY"):
        table.rate("EUR", "CNY", date(2026, 1, 1))


def test_fx_date_rules() -> None:
    kw = dict(tax_point=date(2026, 1, 31), issue_date=date(2026, 2, 3))
    assert fx_date(FxDateRule.TAX_POINT, **kw) == date(2026, 1, 31)
    assert fx_date(FxDateRule.ISSUE_DATE, **kw) == date(2026, 2, 3)
    assert fx_date(FxDateRule.FIRST_OF_MONTH, **kw) == date(2026, 1, 1)


def test_with_rates_adds_and_checks() -> None:
    table = FxTable(tuple(import_csv(CSV)))
    more = table.with_rates([FxRate(date(2026, 2, 1), "USD", "TRY", Decimal("43.1"), "test:CBRT")])
    assert more.rate("USD", "TRY", date(2026, 2, 1)).rate == Decimal("43.1")
    with pytest.raises(FxImportError):
        table.with_rates([FxRate(date(2026, 1, 31), "USD", "SAR", Decimal("3.76"), "other")])


def test_load_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(FxImportError, match="cannot read"):
        load_csv(tmp_path / "none.csv")


def test_shipped_sample_rates_cover_2026_month_starts_and_ends(shipped_fx: FxTable) -> None:
    for quote in ("CNY", "SAR", "RUB", "KZT", "TRY", "AED", "UZS", "EGP", "INR", "KGS", "TJS", "BYN", "PKR"):
        for month in range(1, 13):
            for day in (1, calendar.monthrange(2026, month)[1]):
                used = shipped_fx.rate("USD", quote, date(2026, month, day))
                assert used.source.startswith("sample:") and used.rate > 0
    assert shipped_fx.rate("USD", "SAR", date(2026, 5, 31)).rate == Decimal("3.7500")
    assert shipped_fx.rate("USD", "CNY", date(2025, 12, 1)).source == "sample:PBOC-central-parity"


def test_an_inverse_within_one_percent_is_accepted_and_a_missing_day_uses_the_previous_publication() -> None:
    rows = import_csv(
        "date,base,quote,rate,source\n2026-01-02,USD,CNY,7.10,a\n2026-01-02,CNY,USD,0.1405,b\n"
        "2026-01-02,USD,SAR,3.75,c\n"
    )
    table = FxTable(tuple(rows))
    weekend = table.rate("USD", "CNY", date(2026, 1, 4))  # Sunday: Friday's publication, its own date
    assert (weekend.date, weekend.rate, weekend.source) == (date(2026, 1, 2), Decimal("7.10"), "a")
    cross = table.rate("SAR", "CNY", date(2026, 1, 9))  # 7 days later: still the previous publication
    assert cross.date == date(2026, 1, 2) and cross.source.startswith("cross:USD(")
    with pytest.raises(FxRateMissing, match="nor in the 7 days before"):
        table.rate("USD", "CNY", date(2026, 1, 10))  # 8 days: too old, never "the latest rate"
    with pytest.raises(FxRateMissing):
        table.rate("USD", "CNY", date(2026, 1, 1))  # a later rate is never used


def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    from billing.fx import load_csv

    bad = tmp_path / "rates.csv"
    bad.write_bytes(b"date,base,quote,rate,source\n2026-01-01,USD,CNY,7.1,caf\xe9\n")
    with pytest.raises(FxImportError, match=r"rates.csv: not UTF-8 \(byte 54"):
        load_csv(bad)
