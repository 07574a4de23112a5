"""The token-tax report from the ledger: per language and model, tokens per 1,000 characters and the
premium against English on the same model; the CLI renders the same report as json, csv and html."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from metering.clock import Period
from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.language_report import build, language_report, render
from metering.store_sql import UsageStore
from serving import db_schema
from serving.cli import app as cli_app
from tests.metering.conftest import make_event

ROOT = Path(__file__).resolve().parents[2]
DEC = Period(2026, 12)
IN_DEC = datetime(2026, 12, 3, 10, tzinfo=UTC)


def _ev(
    language: str | None, model: str, prompt: int, completion: int, chars: tuple[int, int] | None, **kw: Any
) -> UsageEvent:
    sizes: dict[str, Any] = (
        {}
        if chars is None
        else {
            "prompt_chars": chars[0],
            "prompt_bytes": chars[0] * 2,
            "completion_chars": chars[1],
            "completion_bytes": chars[1] * 2,
        }
    )
    when = kw.pop("started_at", IN_DEC)
    return make_event(
        language=language,
        model=model,
        prompt_tokens=prompt,
        cached_prompt_tokens=0,
        completion_tokens=completion,
        started_at=when,
        finished_at=when,
        **sizes,
        **kw,
    )


def _events() -> list[UsageEvent]:
    return [
        _ev("en", "m1", 80, 20, (300, 100)),  # 100 tokens / 400 chars = 250 per 1k
        _ev("en", "m1", 40, 10, (150, 50)),  # 50 / 200: the same rate
        _ev("kk", "m1", 180, 60, (200, 100)),  # 240 / 300 = 800 per 1k: 3.2x English
        _ev("kk", "m1", 500, 0, (900, 0), outcome=Outcome.REJECTED),  # counted as a request, not in the rate
        _ev("kk", "m1", 70, 30, None),  # before text sizes existed: tokens only
        _ev("kk", "m2", 90, 30, (200, 100)),  # no English on m2: no premium
        _ev(None, "m1", 5, 5, (20, 20)),  # undetermined
        _ev("kk", "m1", 1, 1, (1, 1), started_at=datetime(2026, 11, 30, 23, tzinfo=UTC)),  # November
    ]


@pytest.fixture
def ledger(engine: Engine) -> UsageStore:
    store = UsageStore(engine)
    store.append_batch(_events())
    return store


def test_the_report_per_language_and_model(ledger: UsageStore) -> None:
    report = language_report(ledger, DEC)
    rows = {(r.language, r.model): r for r in report.rows}
    assert set(rows) == {("en", "m1"), ("kk", "m1"), ("und", "m1"), ("kk", "m2")}
    en, kk = rows["en", "m1"], rows["kk", "m1"]
    assert (en.requests, en.total_tokens, en.characters, en.tokens_per_1k_chars, en.premium_vs_en) == (
        2,
        150,
        600,
        Decimal("250.00"),
        Decimal("1.000"),
    )
    assert (kk.requests, kk.prompt_tokens, kk.completion_tokens, kk.measured_requests) == (3, 750, 90, 1)
    assert (kk.characters, kk.prompt_characters, kk.completion_characters, kk.bytes) == (300, 200, 100, 600)
    assert (kk.tokens_per_1k_chars, kk.premium_vs_en) == (Decimal("800.00"), Decimal("3.200"))
    assert rows["kk", "m2"].premium_vs_en is None and rows["kk", "m2"].tokens_per_1k_chars == Decimal(
        "400.00"
    )
    assert rows["und", "m1"].premium_vs_en == Decimal("1.000")
    assert next(r.language for r in report.rows if r.model == "m1") == "en"  # the baseline first
    only = language_report(ledger, DEC, model="m2")
    assert [(r.language, r.model) for r in only.rows] == [("kk", "m2")]
    assert language_report(ledger, DEC, tenant_id="nobody").rows == ()


def test_no_characters_no_rate() -> None:
    report = build(
        [
            {
                "language": "en",
                "model": "m",
                "requests": 1,
                "prompt_tokens": 5,
                "completion_tokens": 0,
                "sized_requests": 0,
                "sized_prompt_tokens": 0,
                "sized_completion_tokens": 0,
                "prompt_chars": 0,
                "prompt_bytes": 0,
                "completion_chars": 0,
                "completion_bytes": 0,
            }
        ],
        period="2026-12",
    )
    (row,) = report.rows
    assert row.tokens_per_1k_chars is None and row.premium_vs_en is None


def test_the_formats(ledger: UsageStore) -> None:
    report = language_report(ledger, DEC, model="m1")
    data = json.loads(render(report, "json"))
    assert data["object"] == "language_report" and data["period"] == "2026-12" and data["model"] == "m1"
    kk = next(r for r in data["data"] if r["language"] == "kk")
    assert kk["premium_vs_en"] == 3.2 and kk["tokens_per_1k_chars"] == 800.0
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert [r["language"] for r in rows] == ["en", "kk", "und"] and rows[1]["premium_vs_en"] == "3.200"
    html = render(report, "html")
    assert "<td>kk</td>" in html and "3.200" in html and "Token premium by language, 2026-12, m1" in html
    with pytest.raises(ValueError):
        render(report, "pdf")


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'tokenport.db'}")  # the CLI's <data_dir>/tokenport.db
    db_schema.upgrade(engine)
    UsageStore(engine).append_batch(_events())
    engine.dispose()
    yield {"TOKENPORT_DATA_DIR": str(tmp_path), "TOKENPORT_CONFIG": str(ROOT / "configs" / "tokenport.yaml")}


def test_the_cli(cli_env: dict[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        cli_app,
        ["reports", "languages", "--period", "2026-12", "--model", "m1"],
        env=cli_env,
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["data"][1]["premium_vs_en"] == 3.2
    out = tmp_path / "r.csv"
    res = runner.invoke(
        cli_app,
        ["reports", "languages", "--period", "2026-12", "--format", "csv", "--out", str(out)],
        env=cli_env,
        catch_exceptions=False,
    )
    assert res.exit_code == 0 and out.read_text().startswith("language,model,requests")
    bad = runner.invoke(cli_app, ["reports", "languages", "--period", "2026-13"], env=cli_env)
    assert bad.exit_code == 2
    bad = runner.invoke(
        cli_app, ["reports", "languages", "--period", "2026-12", "--format", "pdf"], env=cli_env
    )
    assert bad.exit_code == 2
