"""The month close with real parts: tenants in four countries send real requests through
`tokenport gateway` to a real vLLM worker, then the current month is closed with the CLI.

Checks, for every invoice: line quantities equal the ledger's totals for that tenant exactly, the
usage digest is the sha256 of the tenant's ledger event hashes, subtotal + tax = total, the tax
treatment and FX rates are the expected ones, the PDF opens with pdftotext and shows the number,
`invoices verify` recomputes it from the ledger; and the exports report adds up to the invoices.

Billing reads its own config folder here (same settings and data directory as the gateway): a price
book with demo-scale prices, so that a few hundred real tokens make amounts of several dollars, and
FX rates imported with `tokenport fx import` for the current month (the shipped sample file ends).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from billing.ledger_read import Period
from metering.db import make_engine
from metering.store_sql import UsageStore
from tests.integration.conftest import BIN, MODEL, REPO, Gateway

pytestmark = pytest.mark.integration

TENANTS = {  # id: (billing country, tax id, business, currency, language, origin countries)
    "mc-kz": ("KZ", "123456789013", True, "USD", "ru", ("KZ", "UZ")),
    "mc-sa": ("SA", "300000000000003", True, "USD", "ar", ("SA",)),
    "mc-ru": ("RU", "7707083893", True, "CNY", "ru", ("RU", "BY")),
    "mc-pk": ("PK", None, False, "USD", "en", ("PK",)),  # a consumer where the payer collects: not_collecting
}
TREATMENT = {
    "mc-kz": ("reverse_charge", "0"),
    "mc-sa": ("reverse_charge", "0"),
    "mc-ru": ("supplier_charges", "22"),
    "mc-pk": ("not_collecting", "0"),
}
PRICES = {
    "USD": {"input": "2000", "cached_input": "1000", "output": "4000"},
    "CNY": {"input": "14000", "cached_input": "7000", "output": "28000"},
}
SOURCE = "test:month-close"


@pytest.fixture(scope="module")
def billing_env(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The gateway's environment with TOKENPORT_CONFIG pointing at a copy with test billing configs."""
    cfg = tmp_path_factory.mktemp("month-close-config")
    for name in ("tokenport.yaml", "models.yaml"):
        shutil.copy(REPO / "configs" / name, cfg / name)
    shutil.copytree(REPO / "configs" / "billing", cfg / "billing")
    book = {
        "price_books": [
            {
                "version": "month-close-test",
                "effective_from": "2000-01-01",
                "currencies": {ccy: {"models": {MODEL: prices}} for ccy, prices in PRICES.items()},
            }
        ]
    }
    (cfg / "billing" / "price_books.yaml").write_text(yaml.safe_dump(book), encoding="utf-8")
    (cfg / "billing" / "fx_rates.csv").write_text("date,base,quote,rate,source\n", encoding="utf-8")
    return {**gateway.env, "TOKENPORT_CONFIG": str(cfg / "tokenport.yaml")}


def tokenport(
    env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run(
        [str(BIN / "tokenport"), *args], env=env, capture_output=True, timeout=120, check=False
    )
    assert res.returncode in ok, (args, res.returncode, res.stderr.decode(errors="replace")[-2000:])
    return res


def as_json(res: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(res.stdout)


def send_traffic(gateway: Gateway) -> None:
    for tenant, (country, tax_id, business, currency, language, origins) in TENANTS.items():
        args = [
            "tenants",
            "create",
            "--id",
            tenant,
            "--name",
            f"Month Close {country}",
            "--billing-country",
            country,
            "--business" if business else "--consumer",
            "--currency",
            currency,
            "--language",
            language,
        ]
        gateway.cli_json(*args, *(["--tax-id", tax_id] if tax_id else []))
        key = gateway.cli_json("keys", "create", "--tenant", tenant)
        assert isinstance(key, dict)
        for i, origin in enumerate(origins):
            client = openai.OpenAI(
                base_url=gateway.url + "/v1",
                api_key=key["key"],
                max_retries=0,
                timeout=120,
                default_headers={"X-Client-Country": origin},
            )
            messages: list[ChatCompletionMessageParam] = [
                {"role": "user", "content": f"Name {i + 2} cities in {country}. Answer briefly."}
            ]
            if i % 2:
                stream = client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=24, stream=True
                )
                assert sum(1 for _ in stream) > 0
            else:
                r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
                assert r.usage is not None and r.usage.completion_tokens > 0
            client.close()


def ledger(gateway: Gateway, tenant: str, period: Period) -> tuple[dict[tuple[str, str], int], list[str]]:
    """(model, token type) -> tokens and the event hashes of a tenant's events in the period, from the
    ledger."""
    store = UsageStore(make_engine(f"sqlite:///{gateway.data_dir / 'tokenport.db'}"))
    tokens: dict[tuple[str, str], int] = {}
    hashes: list[str] = []
    for stored in store.iter_events(tenant_id=tenant, start=period.start_at, end=period.end_at):
        e = stored.event
        for token_type, n in e.tokens_by_type().items():
            if n:
                tokens[(e.model, token_type.value)] = tokens.get((e.model, token_type.value), 0) + n
        hashes.append(stored.hash)
    return tokens, hashes


def test_month_close_with_real_usage(gateway: Gateway, billing_env: dict[str, str], tmp_path: Path) -> None:
    send_traffic(gateway)
    period = Period.of(datetime.now(UTC))
    p = str(period)
    rates = tmp_path / "rates.csv"
    rates.write_text(
        f"date,base,quote,rate,source\n{period.start},USD,CNY,7.1234,{SOURCE}\n"
        f"{period.end},USD,SAR,3.7500,{SOURCE}\n",
        encoding="utf-8",
    )
    imported = as_json(tokenport(billing_env, "fx", "import", str(rates), "--json"))
    assert imported["imported"] + imported["already_stored"] == 2

    # Other tests of the session may have left tenants that cannot be invoiced (exit code 1 names them).
    run = as_json(tokenport(billing_env, "invoices", "run", "--period", p, "--json", ok=(0, 1)))
    assert not [e for e in run["errors"] if e["tenant"] in TENANTS], run["errors"]
    assert {d["tenant"] for d in run["drafts"]} >= set(TENANTS)
    assert run["issue_date"] == (period.end + timedelta(days=1)).isoformat()
    again = as_json(tokenport(billing_env, "invoices", "run", "--period", p, "--json", ok=(0, 1)))
    assert {d["ref"]: d["total"] for d in again["drafts"]} == {d["ref"]: d["total"] for d in run["drafts"]}

    fin = as_json(
        tokenport(billing_env, "invoices", "finalize", "--period", p, "--force", "--json", ok=(0, 1))
    )
    assert fin["closed"] and not [r for r in fin["refused"] if r["tenant"] in TENANTS], fin["refused"]
    numbers = {d["tenant"]: d["number"] for d in fin["finalized"] if d["tenant"] in TENANTS}
    assert set(numbers) == set(TENANTS)
    listed = {
        d["number"]: d for d in as_json(tokenport(billing_env, "invoices", "list", "--period", p, "--json"))
    }

    for tenant, number in numbers.items():
        doc = as_json(tokenport(billing_env, "invoices", "show", number, "--format", "json"))
        tokens, hashes = ledger(gateway, tenant, period)
        lines: dict[tuple[str, str], int] = {}
        for line in doc["lines"]:
            assert line["kind"] == "usage", line
            lines[(line["model"], line["token_type"])] = (
                lines.get((line["model"], line["token_type"]), 0) + line["quantity_tokens"]
            )
        assert lines == tokens, tenant
        assert (
            doc["usage_digest"] == "sha256:" + hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
        )
        subtotal, tax, total = Decimal(doc["subtotal"]), Decimal(doc["tax_total"]), Decimal(doc["total"])
        assert subtotal == sum(Decimal(line["amount"]) for line in doc["lines"]) > 0
        assert subtotal + tax == total and listed[number]["total"] == doc["total"]
        assert (doc["taxes"][0]["treatment"], doc["taxes"][0]["rate"]) == TREATMENT[tenant]
        assert doc["currency"] == TENANTS[tenant][3] and doc["buyer"]["language"] == TENANTS[tenant][4]
        assert doc["price_book_version"] == "month-close-test" and doc["tax_rule_id"]
        assert all(f["source"] == SOURCE for f in doc["fx"]), doc["fx"]
        if tenant == "mc-sa":
            assert doc["taxes"][0]["tax_currency"] == "SAR"
            assert [(f["to"], f["date"]) for f in doc["fx"]] == [
                ("SAR", period.end.isoformat()),
                ("CNY", period.start.isoformat()),
            ]
        pdf = tmp_path / f"{number}.pdf"
        tokenport(billing_env, "invoices", "show", number, "--format", "pdf", "--out", str(pdf))
        text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
        assert number in text
        assert as_json(tokenport(billing_env, "invoices", "verify", number, "--json"))["ok"]

    # The exports report adds up: per tenant to its invoice and the ledger, overall to all invoices.
    by_tenant = as_json(tokenport(billing_env, "reports", "exports", "--period", p, "--by", "tenant"))
    groups = {g["key"]: g for g in by_tenant["groups"]}
    all_docs = [
        as_json(tokenport(billing_env, "invoices", "show", n, "--format", "json"))
        for n, d in listed.items()
        if d["status"] == "finalized" and d["kind"] == "invoice"
    ]
    for tenant, number in numbers.items():
        doc = next(d for d in all_docs if d["number"] == number)
        assert groups[tenant]["quantity_tokens"] == sum(ledger(gateway, tenant, period)[0].values())
        assert Decimal(groups[tenant]["revenue_cny"]) == Decimal(doc["ledger"]["net_amount"])
        assert groups[tenant]["revenue_by_currency"] == {doc["currency"]: doc["subtotal"]}
    assert by_tenant["quantity_tokens"] == sum(
        line["quantity_tokens"] for d in all_docs for line in d["lines"]
    )
    assert Decimal(by_tenant["revenue_cny"]) == sum(Decimal(d["ledger"]["net_amount"]) for d in all_docs)
    by_country = as_json(tokenport(billing_env, "reports", "exports", "--period", p, "--by", "country"))
    assert (by_country["quantity_tokens"], by_country["revenue_cny"]) == (
        by_tenant["quantity_tokens"],
        by_tenant["revenue_cny"],
    )
    countries = {g["key"] for g in by_country["groups"]}
    assert {o for t in TENANTS.values() for o in t[5]} <= countries
    csv_text = tokenport(
        billing_env, "reports", "exports", "--period", p, "--by", "country", "--format", "csv"
    ).stdout.decode()
    assert csv_text.splitlines()[-1].startswith(f"total,{by_country['quantity_tokens']},")
