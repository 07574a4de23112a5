"""`tokenport tenants`, `tokenport keys` and `tokenport usage`: accounts and the usage ledger."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from metering.db import make_engine
from metering.event_codec import codec
from metering.store_sql import EXPORT_FIELDS, UsageStore
from metering.tenants import ApiKey, RegistryError, Tenant, TenantStore
from serving import db_schema
from serving.admin.audit import Auditor, Who
from serving.audit_store import AuditStore
from serving.settings import Settings

tenants_app = typer.Typer(help="Tenants: the customer organisations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (shown once, stored as a keyed hash).", no_args_is_help=True)
usage_app = typer.Typer(help="The usage ledger.", no_args_is_help=True)
console = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _settings(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.obj["settings"]()
    return settings


def open_stores(ctx: typer.Context) -> tuple[TenantStore, UsageStore]:
    settings = _settings(ctx)
    engine = make_engine(settings.db_url)
    db_schema.upgrade(engine)
    return TenantStore(engine, settings.secret_key), UsageStore(engine)


def auditor(ctx: typer.Context) -> Auditor:
    """CLI changes are audited too: actor = the OS user, from = this host, source = cli."""
    return Auditor(AuditStore(make_engine(_settings(ctx).db_url)))


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def tenant_dict(t: Tenant) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "billing_country": t.billing_country, "business": t.business,
            "tax_id": t.tax_id, "currency": t.currency, "language": t.language,
            "allowed_models": list(t.allowed_models) if t.allowed_models is not None else None,
            "created_at": t.created_at.isoformat()}


def key_dict(k: ApiKey) -> dict[str, Any]:
    return {"id": k.id, "tenant_id": k.tenant_id, "prefix": k.prefix, "name": k.name,
            "created_at": k.created_at.isoformat(),
            "expires_at": k.expires_at.isoformat() if k.expires_at else None,
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}


@tenants_app.command("create")
def tenants_create(
    ctx: typer.Context,
    id: Annotated[str, typer.Option("--id", help="Tenant id (a-z, 0-9, _ and -).")],
    name: Annotated[str, typer.Option(help="Legal name shown on invoices.")],
    billing_country: Annotated[str, typer.Option(help="Tax residence, ISO 3166-1 alpha-2.")],
    business: Annotated[bool, typer.Option("--business/--consumer", help="B2B (default) or B2C.")] = True,
    tax_id: Annotated[str | None, typer.Option(help="VAT/tax id of a business buyer.")] = None,
    currency: Annotated[str, typer.Option(help="Invoice currency, ISO 4217.")] = "USD",
    language: Annotated[str | None, typer.Option(help="Document language (en, zh, ru, ar, ...).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a tenant."""
    tenants, _ = open_stores(ctx)
    if tax_id is not None:
        from billing.errors import TaxIdInvalid
        from billing.taxid import validate as validate_tax_id

        try:  # an id that fails its checksum could never be invoiced: refuse it now
            validate_tax_id(billing_country, tax_id)
        except TaxIdInvalid as exc:
            fail(f"{exc} (every invoice for this tenant would fail)")
    try:
        detail = {"name": name, "billing_country": billing_country, "business": business, "tax_id": tax_id,
                  "currency": currency, "language": language}
        t = auditor(ctx).run(Who.cli(), "tenant.create", lambda: tenants.create_tenant(
            id=id, name=name, billing_country=billing_country, business=business, tax_id=tax_id, currency=currency,
            language=language), target=id, tenant_id=id, detail=detail)
    except RegistryError as exc:
        fail(str(exc))
        return
    if as_json:
        print(json.dumps(tenant_dict(t)))
    else:
        console.print(f"created tenant [bold]{t.id}[/bold] ({t.name}, {t.billing_country}, {t.currency}, "
                      f"{'business' if t.business else 'consumer'})")


@tenants_app.command("list")
def tenants_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List tenants."""
    tenants, _ = open_stores(ctx)
    rows = tenants.list_tenants()
    if as_json:
        print(json.dumps([tenant_dict(t) for t in rows]))
        return
    table = Table("id", "name", "billing country", "type", "tax id", "currency")
    for t in rows:
        table.add_row(t.id, t.name, t.billing_country, "business" if t.business else "consumer",
                      t.tax_id or "", t.currency)
    console.print(table)


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    expires_in_days: Annotated[int | None, typer.Option(help="Expire the key after N days.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key. The key is printed once and never stored in clear."""
    tenants, _ = open_stores(ctx)
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
    try:
        key, plaintext = auditor(ctx).run(
            Who.cli(), "key.create", lambda: tenants.create_key(tenant, name=name, expires_at=expires),
            tenant_id=tenant, detail={"name": name, "expires_at": expires.isoformat() if expires else None},
            describe=lambda res: {"target": res[0].id, "prefix": res[0].prefix})
    except RegistryError as exc:
        fail(str(exc))
        return
    if as_json:
        print(json.dumps({**key_dict(key), "key": plaintext}))
    else:
        console.print(f"key [bold]{key.id}[/bold] for tenant {tenant} (shown once, store it now):")
        print(plaintext)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="Key id (key_...).")],
                as_json: JsonOpt = False) -> None:
    """Revoke a key; running gateways refuse it within a quarter of a second."""
    tenants, _ = open_stores(ctx)
    try:
        found = tenants.get_key(key_id)
        key = auditor(ctx).run(Who.cli(), "key.revoke", lambda: tenants.revoke_key(key_id), target=key_id,
                               tenant_id=found.tenant_id if found else None)
    except RegistryError as exc:
        fail(str(exc))
        return
    if as_json:
        print(json.dumps(key_dict(key)))
    else:
        console.print(f"revoked {key.id} (tenant {key.tenant_id})")


@keys_app.command("list")
def keys_list(ctx: typer.Context, tenant: Annotated[str | None, typer.Option(help="Tenant id.")] = None,
              as_json: JsonOpt = False) -> None:
    """List keys (ids and prefixes only)."""
    tenants, _ = open_stores(ctx)
    rows = tenants.list_keys(tenant)
    if as_json:
        print(json.dumps([key_dict(k) for k in rows]))
        return
    table = Table("id", "tenant", "prefix", "created", "state")
    for k in rows:
        state = "revoked" if k.revoked_at else ("expires " + k.expires_at.date().isoformat() if k.expires_at else "active")
        table.add_row(k.id, k.tenant_id, k.prefix + "…", k.created_at.strftime("%Y-%m-%d %H:%M"), state)
    console.print(table)


def parse_day(value: str | None, option: str) -> datetime | None:
    """A date (YYYY-MM-DD, taken as 00:00 UTC) or an ISO 8601 timestamp."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(value)  # Python 3.11 reads a trailing "Z"
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        fail(f"{option} must be YYYY-MM-DD or an ISO 8601 timestamp, got {value!r}")
        raise


@usage_app.command("export")
def usage_export(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="Tenant id (all tenants if left out).")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start (inclusive): YYYY-MM-DD or ISO time.")] = None,
    to: Annotated[str | None, typer.Option(help="End (exclusive): YYYY-MM-DD or ISO time.")] = None,
    format: Annotated[str, typer.Option(help="jsonl or csv.")] = "jsonl",
) -> None:
    """Export usage events with exact token counts, in ledger order."""
    if format not in ("jsonl", "csv"):
        fail("--format must be jsonl or csv")
    _, usage = open_stores(ctx)
    start, end = parse_day(from_, "--from"), parse_day(to, "--to")
    writer = csv.DictWriter(sys.stdout, fieldnames=EXPORT_FIELDS) if format == "csv" else None
    if writer is not None:
        writer.writeheader()
    for stored in usage.iter_events(tenant_id=tenant, start=start, end=end):
        row = codec().to_record(stored.event)  # every field, as EXPORT_FIELDS lists them
        if writer is not None:
            writer.writerow(row)
        else:
            sys.stdout.write(json.dumps(row) + "\n")


@usage_app.command("summary")
def usage_summary(
    ctx: typer.Context,
    by: Annotated[str, typer.Option(help="Comma-separated: tenant,origin_country,model,language,outcome,...")]
    = "tenant,origin_country,model",
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start (inclusive).")] = None,
    to: Annotated[str | None, typer.Option(help="End (exclusive).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Token totals grouped by tenant, origin country, model, ..."""
    _, usage = open_stores(ctx)
    fields = [("tenant_id" if f.strip() == "tenant" else f.strip()) for f in by.split(",") if f.strip()]
    try:
        rows = usage.summary(fields, tenant_id=tenant, start=parse_day(from_, "--from"), end=parse_day(to, "--to"))
    except ValueError as exc:
        fail(str(exc))
        return
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(*[f.replace("tenant_id", "tenant") for f in fields], "requests", "prompt", "cached", "completion")
    for r in rows:
        table.add_row(*[str(r[f]) for f in fields], str(r["requests"]), str(r["prompt_tokens"]),
                      str(r["cached_prompt_tokens"]), str(r["completion_tokens"]))
    console.print(table)


@usage_app.command("verify")
def usage_verify(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Option("--file", help="Check a download of /v1/usage/events (JSON pages or "
                                               "JSONL rows) instead of the ledger: each event's hash and the totals.")]
    = None,
    anchor: Annotated[list[str] | None, typer.Option(help="SEQ:HASH that must still be in the chain (a head "
                                                          "recorded earlier). Repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the ledger's hash chain and name the first broken link (exit 1 if there is one)."""
    from metering.verify import parse_anchor, verify_chain, verify_event_rows

    try:
        anchors = dict(parse_anchor(a) for a in anchor or [])
    except ValueError as exc:
        fail(str(exc))
        return
    if file is not None:
        report = verify_event_rows(_download_rows(file))
    else:
        _, usage = open_stores(ctx)
        report = verify_chain(usage.iter_events(), anchors)
    if as_json:
        print(json.dumps(report.as_dict()))
    elif report.first_break is None:
        console.print(f"[green]ok[/green]: {report.events} events, chain head seq {report.head_seq} "
                      f"hash {report.head_hash}", highlight=False, soft_wrap=True)
        console.print(f"tokens: prompt {report.prompt_tokens} (cached {report.cached_prompt_tokens}), "
                      f"completion {report.completion_tokens}", highlight=False)
    else:
        console.print(f"[red]broken[/red] after {report.events} good events: {report.first_break.describe()}",
                      highlight=False, soft_wrap=True)
    if report.first_break is not None:
        raise typer.Exit(1)


def _download_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a /v1/usage/events download: one JSON page, several pages, or JSONL rows."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
        docs = doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for d in docs:
        if isinstance(d, dict) and isinstance(d.get("data"), list):
            rows.extend(d["data"])
        elif isinstance(d, dict):
            rows.append(d)
    return rows
