"""`tokenport credits`: prepaid credit — top-ups (paid, with a numbered receipt) and promotional grants,
and a tenant's balance (billing/credits.py, serving/credits.py)."""

from __future__ import annotations

import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from billing.errors import BillingError
from metering.tenants import RegistryError
from serving import credits
from serving.audit import Who
from serving.cli.common import JsonOpt, arg, emit, fail, stores
from serving.dates import parse_day

credits_app = typer.Typer(
    help="Prepaid credit: top-ups with receipts, promotional grants, balances.", no_args_is_help=True
)
console = Console(stderr=True)


@credits_app.command("add")
def credits_add(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    amount: Annotated[str, typer.Option(help="Amount in the tenant's currency, e.g. 500.00.")],
    reference: Annotated[str, typer.Option(help="The bank transfer's reference, or the campaign.")],
    kind: Annotated[str, typer.Option(help="paid (a top-up: gets a receipt) or promotional.")] = "paid",
    expires_on: Annotated[
        str | None, typer.Option(help="Promotional credit only: unused after this day (YYYY-MM-DD).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Grant prepaid credit (audited): the next invoices use it; a prepaid money budget grows with it."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        fail("--amount is a decimal like 500.00", 2, console)
    expiry = arg(lambda: parse_day(expires_on, "--expires-on")) if expires_on else None
    s = stores(ctx)
    try:
        got = credits.add_credit(
            s.billing,
            s.accounts,
            Who.cli(),
            tenant,
            kind=kind,
            amount=value,
            reference=reference,
            expires_on=expiry,
        )
    except (BillingError, RegistryError) as exc:
        fail(str(exc), 1, console)
    if as_json:
        emit(got)
    else:
        receipt = f", receipt {got['receipt_number']}" if got["receipt_number"] else ""
        console.print(
            f"{tenant}: {got['amount']} {got['currency']} {got['kind']} credit{receipt}", highlight=False
        )


@credits_app.command("balance")
def credits_balance(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    as_json: JsonOpt = False,
) -> None:
    """A tenant's prepaid credit: paid and promotional apart, and every grant and use."""
    s = stores(ctx)
    try:
        got = credits.balance(s.billing, s.accounts, tenant)
    except (BillingError, RegistryError) as exc:
        fail(str(exc), 1, console)
    if as_json:
        emit(got)
        return
    console.print(
        f"{tenant}: {got['total']} {got['currency']} (paid {got['paid']}, promotional {got['promotional']})",
        highlight=False,
    )


@credits_app.command("receipt")
def credits_receipt(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="A receipt number, e.g. TP-RCP-2027-000001.")],
    fmt: Annotated[str, typer.Option("--format", help="json, html or pdf.")] = "json",
    out: Annotated[Path | None, typer.Option(help="Write to this file (default: standard output).")] = None,
) -> None:
    """A prepaid-credit receipt, in the tenant's language."""
    s = stores(ctx)
    try:
        data = s.billing.receipt(number, fmt)
    except BillingError as exc:
        fail(str(exc), 1, console)
    if out is not None:
        out.write_bytes(data)
        console.print(f"{number}: {len(data):,} bytes written to {out}", highlight=False)
    else:
        sys.stdout.buffer.write(data)
