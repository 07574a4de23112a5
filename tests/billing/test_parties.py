from datetime import date
from pathlib import Path

import pytest
import yaml

from billing.errors import ConfigError
from billing.parties import NumberSeries, Seller, load_seller

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_issuer(seller: Seller) -> None:
    assert (seller.country, seller.tax_id) == ("CN", "91120116MA05T8QX3G")
    assert seller.registration_in("RU", date(2026, 1, 1)) is not None
    assert seller.registration_in("RU", date(2024, 12, 31)) is None
    assert seller.registration_in("KZ", date(2026, 1, 1)) is None
    assert seller.numbering.format("invoice", 2026, 42) == "TP-INV-2026-000042"
    assert seller.numbering.format("credit_note", 2026, 1) == "TP-CRN-2026-000001"
    assert NumberSeries("A-", "C-", 3).format("invoice", 2027, 5) == "A-2027-005"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tax_id": "91120116MA05T8QX3A"}, "tax_id"),
        (
            {"vat_registrations": {"SA": {"number": "12", "effective_from": "2026-01-01"}}},
            "vat_registrations.SA.number",
        ),
        ({"country": "China"}, "country"),
        (
            {"bank": {"bank_name": "b", "account_name": "a", "account_number": "1", "swift": "bad"}},
            "bank.swift",
        ),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_issuer_errors_name_the_field(tmp_path: Path, change: dict[str, object], field: str) -> None:
    data = yaml.safe_load((ROOT / "configs/billing/issuer.yaml").read_text())
    data.update(change)
    path = tmp_path / "issuer.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(ConfigError) as err:
        load_seller(path)
    assert err.value.field == field and str(err.value).startswith(str(path))
