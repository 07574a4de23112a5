"""`tokenport usage export | summary | verify`: the usage ledger from the command line."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from metering.event_codec import codec
from metering.store_sql import EXPORT_FIELDS
from serving.cli.common import JsonOpt, arg, fail, stores
from serving.dates import parse_instant

usage_app = typer.Typer(help="The usage ledger.", no_args_is_help=True)
console = Console()


def window(from_: str | None, to: str | None) -> tuple[datetime | None, datetime | None]:
    return (
        arg(lambda: parse_instant(from_, "--from", unix=False)),
        arg(lambda: parse_instant(to, "--to", unix=False)),
    )


@usage_app.command("export")
def usage_export(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="Tenant id (all tenants if left out).")] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="Start (inclusive): YYYY-MM-DD or ISO time.")
    ] = None,
    to: Annotated[str | None, typer.Option(help="End (exclusive): YYYY-MM-DD or ISO time.")] = None,
    format: Annotated[str, typer.Option(help="jsonl or csv.")] = "jsonl",
) -> None:
    """Export usage events with exact token counts, in ledger order."""
    if format not in ("jsonl", "csv"):
        fail("--format must be jsonl or csv")
    start, end = window(from_, to)
    usage = stores(ctx).usage
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
    by: Annotated[
        str, typer.Option(help="Comma-separated: tenant,origin_country,model,language,outcome,...")
    ] = "tenant,origin_country,model",
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start (inclusive).")] = None,
    to: Annotated[str | None, typer.Option(help="End (exclusive).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Token totals grouped by tenant, origin country, model, ..."""
    fields = [("tenant_id" if f.strip() == "tenant" else f.strip()) for f in by.split(",") if f.strip()]
    start, end = window(from_, to)
    try:
        rows = stores(ctx).usage.summary(fields, tenant_id=tenant, start=start, end=end)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(
        *[f.replace("tenant_id", "tenant") for f in fields], "requests", "prompt", "cached", "completion"
    )
    for r in rows:
        table.add_row(
            *[str(r[f]) for f in fields],
            str(r["requests"]),
            str(r["prompt_tokens"]),
            str(r["cached_prompt_tokens"]),
            str(r["completion_tokens"]),
        )
    console.print(table)


@usage_app.command("verify")
def usage_verify(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Check a download of /v1/usage/events (JSON pages or "
            "JSONL rows) instead of the ledger: each event's hash and the totals.",
        ),
    ] = None,
    anchor: Annotated[
        list[str] | None,
        typer.Option(help="SEQ:HASH that must still be in the chain (a head recorded earlier). Repeatable."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the ledger's hash chain and name the first broken link (exit 1 if there is one)."""
    from metering.verify import parse_anchor, verify_chain, verify_event_rows

    try:
        anchors = dict(parse_anchor(a) for a in anchor or [])
    except ValueError as exc:
        fail(str(exc))
    if file is not None:
        report = verify_event_rows(_download_rows(file))
    else:
        report = verify_chain(stores(ctx).usage.iter_events(), anchors)
    if as_json:
        print(json.dumps(report.as_dict()))
    elif report.first_break is None:
        console.print(
            f"[green]ok[/green]: {report.events} events, chain head seq {report.head_seq} "
            f"hash {report.head_hash}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"tokens: prompt {report.prompt_tokens} (cached {report.cached_prompt_tokens}), "
            f"completion {report.completion_tokens}",
            highlight=False,
        )
    else:
        console.print(
            f"[red]broken[/red] after {report.events} good events: {report.first_break.describe()}",
            highlight=False,
            soft_wrap=True,
        )
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
