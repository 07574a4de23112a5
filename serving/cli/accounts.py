"""`tokenport tenants create | list` and `tokenport keys create | revoke | list` (changes audited).

The JSON printed with `--json` is the admin API's (serving/accounts.py: `tenant_json`, `key_json`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from metering.tenants import RegistryError
from serving.accounts import key_expiry, key_json, tenant_json
from serving.audit import Who
from serving.cli.common import JsonOpt, fail, stores

tenants_app = typer.Typer(help="Tenants: the customer organisations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (shown once, stored as a keyed hash).", no_args_is_help=True)
console = Console()


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
    accounts = stores(ctx).accounts
    try:
        t = accounts.create_tenant(
            Who.cli(),
            id=id,
            name=name,
            billing_country=billing_country,
            business=business,
            tax_id=tax_id,
            currency=currency,
            language=language,
        )
    except RegistryError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(tenant_json(t)))
    else:
        console.print(
            f"created tenant [bold]{t.id}[/bold] ({t.name}, {t.billing_country}, {t.currency}, "
            f"{'business' if t.business else 'consumer'})"
        )


@tenants_app.command("update")
def tenants_update(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    name: Annotated[str | None, typer.Option(help="Legal name shown on invoices.")] = None,
    billing_country: Annotated[str | None, typer.Option(help="Tax residence, ISO 3166-1 alpha-2.")] = None,
    business: Annotated[bool | None, typer.Option("--business/--consumer", help="B2B or B2C.")] = None,
    tax_id: Annotated[str | None, typer.Option(help="VAT/tax id ('' removes it).")] = None,
    currency: Annotated[str | None, typer.Option(help="Invoice currency, ISO 4217.")] = None,
    language: Annotated[
        str | None, typer.Option(help="Document language (en, zh, ru, ar, kk, uz, tr).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Edit a tenant's billing data (audited; checked as at creation). Issued invoices keep the buyer
    they were issued to; the next draft, or a re-issue after a void, uses the new data."""
    given: dict[str, str | bool | None] = {
        "name": name,
        "billing_country": billing_country,
        "business": business,
        "tax_id": tax_id,
        "currency": currency,
        "language": language,
    }
    changes: dict[str, str | bool | None] = {k: v for k, v in given.items() if v is not None}
    if "tax_id" in changes and changes["tax_id"] == "":
        changes["tax_id"] = None
    if not changes:
        fail(
            "nothing to change: give at least one of --name, --billing-country, --business/--consumer, "
            "--tax-id, --currency, --language"
        )
    try:
        t = stores(ctx).accounts.update_tenant(Who.cli(), tenant, changes)
    except RegistryError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(tenant_json(t)))
    else:
        console.print(f"updated tenant [bold]{t.id}[/bold]: {', '.join(sorted(changes))}")


@tenants_app.command("list")
def tenants_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List tenants."""
    s = stores(ctx)
    if as_json:
        print(json.dumps(s.accounts.tenants_json()))
        return
    table = Table("id", "name", "billing country", "type", "tax id", "currency")
    for t in s.tenants.list_tenants():
        table.add_row(
            t.id,
            t.name,
            t.billing_country,
            "business" if t.business else "consumer",
            t.tax_id or "",
            t.currency,
        )
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
    accounts = stores(ctx).accounts
    try:
        key, plaintext = accounts.create_key(
            Who.cli(), tenant, name=name, expires_at=key_expiry(None, expires_in_days or None)
        )
    except RegistryError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps({**key_json(key), "key": plaintext}))
    else:
        console.print(f"key [bold]{key.id}[/bold] for tenant {tenant} (shown once, store it now):")
        print(plaintext)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="Key id (key_...).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key; running gateways refuse it within a quarter of a second."""
    accounts = stores(ctx).accounts
    try:
        key = accounts.revoke_key(Who.cli(), key_id)
    except RegistryError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(key_json(key, accounts.policy("key", key.id))))
    else:
        console.print(f"revoked {key.id} (tenant {key.tenant_id})")


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="Tenant id.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List keys (ids and prefixes only)."""
    s = stores(ctx)
    if as_json:
        print(json.dumps(s.accounts.keys_json(tenant, must_exist=False)))
        return
    table = Table("id", "tenant", "prefix", "created", "state")
    for k in s.tenants.list_keys(tenant):
        state = (
            "revoked"
            if k.revoked_at
            else ("expires " + k.expires_at.date().isoformat() if k.expires_at else "active")
        )
        table.add_row(k.id, k.tenant_id, k.prefix + "…", k.created_at.strftime("%Y-%m-%d %H:%M"), state)
    console.print(table)
