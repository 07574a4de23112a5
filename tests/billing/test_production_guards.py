"""Production mode issues nothing with the sample issuer or a `sample:` FX rate (issue 13, guards);
local mode keeps working with both (demos, tests)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import yaml
from month_world import World, make_world

from billing.errors import DocumentStateError
from metering.clock import Period

DEC = Period(2025, 12)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def _issuer(world: World, *, sample: bool) -> None:
    path = world.config_dir / "issuer.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.pop("sample", None)
    if sample:
        data["sample"] = True
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")


def test_production_refuses_the_sample_issuer_and_sample_rates(world: World) -> None:
    world.use("sa-retail", date(2025, 12, 5), prompt=1_000_000, origin="SA")  # SAR tax: an FX use
    world.use("ru-soft", date(2025, 12, 5), prompt=1_000_000, origin="RU")
    world.clock.now = datetime(2026, 1, 2, 9, tzinfo=UTC)
    world.svc.production = True
    world.svc.run(DEC)
    with pytest.raises(DocumentStateError, match="issuer is the shipped sample"):
        world.svc.finalize(DEC)
    _issuer(world, sample=False)
    report = world.svc.finalize(DEC)
    refused = dict(report.refused)
    assert "sample:" in refused["sa-retail"] and "tokenport fx import" in refused["sa-retail"]
    assert not [r for r in report.finalized if r.tenant_id == "sa-retail"]

    # with published rates for those dates the same drafts are issued
    rates = "date,base,quote,rate,source\n"
    for day in ("2025-12-01", "2025-12-31", "2026-01-01", "2026-01-02"):
        rates += f"{day},USD,CNY,7.0950,PBOC-central-parity\n{day},USD,SAR,3.7500,SAMA\n"
        rates += f"{day},USD,RUB,80.5000,CBR\n"
    (world.config_dir / "fx_rates.csv").write_text(rates, encoding="utf-8")
    world.svc.run(DEC, tenant_id="sa-retail")
    again = world.svc.finalize(DEC, tenant_id="sa-retail")
    assert [r.tenant_id for r in again.finalized] == ["sa-retail"], again.refused


def test_local_mode_issues_with_the_samples(world: World) -> None:
    world.use("sa-retail", date(2025, 12, 5), prompt=1_000_000, origin="SA")
    world.clock.now = datetime(2026, 1, 2, 9, tzinfo=UTC)
    world.svc.run(DEC)
    assert [r.tenant_id for r in world.svc.finalize(DEC).finalized] == ["sa-retail"]
