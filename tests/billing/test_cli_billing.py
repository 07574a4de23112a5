"""`tokenport invoices|fx|reports` through typer's CliRunner, against a temporary data directory whose
ledger is filled with hand-made usage events (UsageStore.append_batch)."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving import db_schema
from serving.cli import app as cli_app

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


class Cli:
    def __init__(self, data_dir: Path) -> None:
        self.runner = CliRunner()
        self.env = {
            "TOKENPORT_DATA_DIR": str(data_dir),
            "TOKENPORT_CONFIG": str(ROOT / "configs" / "tokenport.yaml"),
        }

    def __call__(self, *args: str, code: int = 0) -> Result:
        res = self.runner.invoke(cli_app, list(args), env=self.env, catch_exceptions=False)
        assert res.exit_code == code, (args, res.stdout, res.stderr)
        return res

    def json(self, *args: str, code: int = 0) -> object:
        return json.loads(self(*args, "--json", code=code).stdout)


@pytest.fixture()
def cli(tmp_path: Path) -> Iterator[Cli]:
    engine = make_engine(f"sqlite:///{tmp_path / 'tokenport.db'}")
    db_schema.upgrade(engine)
    tenants = TenantStore(engine, "unused-for-reading-tenants-000000")
    tenants.create_tenant(
        id="kz-bank", name="Almaty Bank JSC", billing_country="KZ", tax_id="123456789013", language="ru"
    )
    tenants.create_tenant(
        id="sa-co", name="Jeddah Trading Co", billing_country="SA", tax_id="300000000000003", language="ar"
    )
    tenants.create_tenant(id="kz-typo", name="Typo LLP", billing_country="KZ", tax_id="123456789012")

    def event(tenant: str, day: int, prompt: int, completion: int, origin: str) -> UsageEvent:
        when = datetime(2026, 1, day, 10, tzinfo=UTC)
        return UsageEvent(
            request_id="req_" + uuid.uuid4().hex,
            tenant_id=tenant,
            key_id="key_cli",
            model=MODEL,
            origin_country=origin,
            prompt_tokens=prompt,
            cached_prompt_tokens=0,
            completion_tokens=completion,
            stream=True,
            outcome=Outcome.OK,
            started_at=when,
            finished_at=when,
            language="ru",
        )

    UsageStore(engine).append_batch(
        [
            event("kz-bank", 2, 30_000_000, 10_000_000, "KZ"),
            event("kz-bank", 9, 5_000_000, 5_000_000, "UZ"),
            event("sa-co", 4, 50_000_000, 25_000_000, "SA"),
            event("kz-typo", 5, 1_000, 1_000, "KZ"),
        ]
    )
    engine.dispose()
    yield Cli(tmp_path)


def test_month_close_from_the_command_line(cli: Cli, tmp_path: Path) -> None:
    run = cli.json("invoices", "run", "--period", "2026-01", code=1)  # one tenant has an invalid tax id
    assert isinstance(run, dict)
    assert [d["ref"] for d in run["drafts"]] == ["DRAFT-2026-01-kz-bank", "DRAFT-2026-01-sa-co"]
    assert [e["tenant"] for e in run["errors"]] == ["kz-typo"] and "invalid tax id" in run["errors"][0][
        "error"
    ]
    assert run["issue_date"] == "2026-02-01"
    listed = cli.json("invoices", "list")
    assert isinstance(listed, list)
    assert {(d["ref"], d["status"], d["tenant"], d["period"]) for d in listed} == {
        ("DRAFT-2026-01-kz-bank", "draft", "kz-bank", "2026-01"),
        ("DRAFT-2026-01-sa-co", "draft", "sa-co", "2026-01"),
        ("DRAFT-2026-01-kz-typo", "error", "kz-typo", "2026-01"),
    }
    assert all({"number", "status", "tenant", "period", "total"} <= set(d) for d in listed)
    # kz-bank: 35M input x 0.020 + 15M output x 0.040 = 0.70 + 0.60 USD, reverse charge
    assert next(d for d in listed if d["tenant"] == "kz-bank")["total"] == "1.30"

    fin = cli.json("invoices", "finalize", "--period", "2026-01", code=1)
    assert isinstance(fin, dict)
    assert [(d["number"], d["tenant"]) for d in fin["finalized"]] == [
        ("TP-INV-2026-000001", "kz-bank"),
        ("TP-INV-2026-000002", "sa-co"),
    ]
    assert [r["tenant"] for r in fin["refused"]] == ["kz-typo"] and "cannot finalize" in fin["refused"][0][
        "error"
    ]
    cli(
        "invoices", "finalize", "--period", "2026-01", "--tenant", "kz-bank", code=1
    )  # nothing left to finalize

    shown = cli("invoices", "show", "TP-INV-2026-000001", "--format", "json").stdout_bytes
    doc = json.loads(shown)
    assert (doc["number"], doc["status"], doc["buyer"]["language"], doc["total"]) == (
        "TP-INV-2026-000001",
        "finalized",
        "ru",
        "1.30",
    )
    assert {"usage_digest", "price_book_version", "tax_rule_id", "fx", "lines", "subtotal", "taxes"} <= set(
        doc
    )
    pdf = cli("invoices", "show", "TP-INV-2026-000002", "--format", "pdf").stdout_bytes
    out = tmp_path / "inv.pdf"
    cli("invoices", "show", "TP-INV-2026-000002", "--format", "pdf", "--out", str(out))
    assert pdf.startswith(b"%PDF-") and out.read_bytes() == pdf
    text = subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True, check=True).stdout
    assert "TP-INV-2026-000002" in text
    assert cli("invoices", "show", "TP-INV-2026-000001", "--format", "ubl").stdout.startswith("<?xml")
    assert cli("invoices", "show", "TP-INV-2026-000001", "--format", "csv").stdout.startswith(
        "document,kind,row"
    )
    assert (
        cli("invoices", "show", "TP-INV-2026-000001", "--format", "json").stdout_bytes == shown
    )  # later: same

    voided = cli.json("invoices", "void", "TP-INV-2026-000001", "--reason", "duplicate order")
    assert isinstance(voided, dict)
    assert voided["credit_note"]["number"] == "TP-CRN-2026-000001"
    assert voided["credit_note"]["original_number"] == "TP-INV-2026-000001"
    assert voided["invoice"]["status"] == "void"
    assert "TP-CRN-2026-000001" in cli("invoices", "list").stdout

    report = json.loads(
        cli("reports", "exports", "--period", "2026-01", "--by", "country", "--format", "json").stdout
    )
    assert report["quantity_tokens"] == 75_000_000  # sa-co only: kz-bank's invoice was credited in full
    assert {g["key"]: g["quantity_tokens"] for g in report["groups"]} == {"SA": 75_000_000, "KZ": 0, "UZ": 0}
    csv_out = cli("reports", "exports", "--period", "2026-01", "--by", "tenant", "--format", "csv").stdout
    assert csv_out.splitlines()[0] == "tenant,quantity_tokens,revenue_cny,currency,revenue,documents"
    html = cli("reports", "exports", "--period", "2026-01", "--format", "html").stdout
    assert html.startswith("<!DOCTYPE html>") and "Token exports 2026-01" in html
    assert cli.json("invoices", "verify", "TP-INV-2026-000002") == {
        "number": "TP-INV-2026-000002",
        "ok": True,
        "events": 1,
        "problems": [],
    }


def test_fx_import_and_errors(cli: Cli, tmp_path: Path) -> None:
    rates = tmp_path / "rates.csv"
    rates.write_text(
        "# central bank feed\ndate,base,quote,rate,source\n2027-01-01,USD,KZT,530.10,NBK\n", encoding="utf-8"
    )
    assert cli.json("fx", "import", str(rates)) == {"imported": 1, "already_stored": 0}
    assert cli.json("fx", "import", str(rates)) == {"imported": 0, "already_stored": 1}
    assert cli.json("fx", "list", "--date", "2027-01-01") == [
        {"date": "2027-01-01", "base": "USD", "quote": "KZT", "rate": "530.10", "source": "NBK"}
    ]
    rates.write_text("date,base,quote,rate,source\n2027-01-01,USD,KZT,1.0,other\n", encoding="utf-8")
    assert "two different USD/KZT rates" in cli("fx", "import", str(rates), code=1).stderr
    rates.write_text("date,base,quote,rate\n2027-01-01,USD,KZT,1.0\n", encoding="utf-8")
    assert "header must be date,base,quote,rate,source" in cli("fx", "import", str(rates), code=1).stderr

    assert "YYYY-MM" in cli("invoices", "run", "--period", "2026-13", code=2).stderr
    assert "no invoice or credit note" in cli("invoices", "show", "TP-INV-2099-000001", code=1).stderr
    assert "--format must be one of" in cli("invoices", "show", "X", "--format", "docx", code=2).stderr
    assert "has not been run" in cli("invoices", "finalize", "--period", "2026-01", code=1).stderr
    cli("invoices", "run", "--period", "2026-01", "--tenant", "kz-bank")
    assert (
        "UBL is written for finalized documents only"
        in cli("invoices", "show", "DRAFT-2026-01-kz-bank", "--format", "ubl", code=1).stderr
    )
    draft_html = cli("invoices", "show", "DRAFT-2026-01-kz-bank", "--format", "html").stdout
    assert 'lang="ru"' in draft_html
    custom = cli.json(
        "invoices", "run", "--period", "2026-01", "--tenant", "kz-bank", "--issue-date", "2026-02-10"
    )
    assert isinstance(custom, dict) and custom["drafts"][0]["issue_date"] == "2026-02-10"


def test_a_running_month_needs_force_and_a_voided_invoice_can_be_reissued(cli: Cli, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    running = f"{now.year:04d}-{now.month:02d}"
    engine = make_engine(f"sqlite:///{tmp_path / 'tokenport.db'}")
    UsageStore(engine).append_batch(
        [
            UsageEvent(
                request_id="req_" + uuid.uuid4().hex,
                tenant_id="sa-co",
                key_id="key_cli",
                model=MODEL,
                origin_country="SA",
                prompt_tokens=1_000_000,
                cached_prompt_tokens=0,
                completion_tokens=1_000_000,
                stream=False,
                outcome=Outcome.OK,
                started_at=now,
                finished_at=now,
                language="ar",
            )
        ]
    )
    engine.dispose()
    cli("invoices", "run", "--period", running, "--tenant", "sa-co")
    refused = cli("invoices", "finalize", "--period", running, "--tenant", "sa-co", code=1)
    assert "is still open" in refused.stderr
    fin = cli.json("invoices", "finalize", "--period", running, "--tenant", "sa-co", "--force")
    assert isinstance(fin, dict) and fin["forced"] is True and len(fin["finalized"]) == 1
    number = fin["finalized"][0]["number"]
    audit = cli.json("admin", "audit", "--action", "invoices.finalize")
    assert isinstance(audit, list) and any(a["detail"].get("force") is True for a in audit)

    cli("invoices", "void", number, "--reason", "wrong legal name")
    again = cli.json("invoices", "reissue", number)
    assert isinstance(again, dict) and again["voided"] == number
    assert again["invoice"]["number"] != number and again["invoice"]["status"] == "finalized"
    assert again["invoice"]["total"] == fin["finalized"][0]["total"]  # the same usage, billed once again
    cli("invoices", "reissue", number, code=1)  # a voided invoice is re-issued once
    # the re-issued invoice is paid from the command line (the contract), net of the 5 % the
    # Saudi buyer withheld, with its certificate; a partial credit note first
    new = again["invoice"]["number"]
    credit = cli.json("invoices", "credit", new, "--amount", "0.01", "--reason", "goodwill")
    assert isinstance(credit, dict) and credit["credit_note"]["number"].startswith("TP-CRN-")
    status = cli.json("invoices", "status", new)
    assert isinstance(status, dict) and status["status"] == "open" and status["withholding_rate"] == "5"
    due = Decimal(status["outstanding"])
    wht = (due * Decimal("0.05")).quantize(Decimal("0.01"))
    paid = cli.json(
        "invoices", "pay", new, "--amount", str(due - wht), "--date", now.date().isoformat(),
        "--reference", "SWIFT-77", "--wht-amount", str(wht), "--wht-certificate", "ZATCA-WHT-1",
    )  # fmt: skip
    assert isinstance(paid, dict) and paid["status"] == "paid" and paid["outstanding"] == "0.00"
    assert (
        "more than"
        in cli(
            "invoices", "pay", new, "--amount", "1", "--date", "2026-01-05", "--reference", "x", code=1
        ).stderr
    )
    aging = cli.json("invoices", "aging")
    assert isinstance(aging, dict) and all(r["tenant"] != "sa-co" for r in aging["data"])
