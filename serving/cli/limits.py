"""`tokenport tenants set-limits | limits | top-up`, `tokenport keys set-limits` and `tokenport admin
audit | purge-content`: limits, budgets and the audit log from the command line (all changes audited).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from metering.clock import utcnow
from metering.tenants import RegistryError
from serving.accounts import UNSET
from serving.audit import Who
from serving.cli.accounts import keys_app, tenants_app
from serving.cli.common import JsonOpt, fail, stores
from serving.limits.policy import LimitPolicy
from serving.limits.pricing import PriceBookPricer, PriceUnavailable, cost_units
from serving.limits.store import Scope, make_budget

admin_app = typer.Typer(help="Admin: the audit log and data retention.", no_args_is_help=True)
console = Console()
Opt = typer.Option
ZERO = "0 removes the limit."


def _changes(
    rpm: int | None,
    tpm: int | None,
    max_tokens: int | None,
    max_prompt_tokens: int | None,
    timeout: int | None,
    budget: str | None,
    budget_unit: str,
    budget_period: str,
    no_budget: bool,
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name, value in (
        ("rpm", rpm),
        ("tpm", tpm),
        ("max_tokens", max_tokens),
        ("max_prompt_tokens", max_prompt_tokens),
        ("request_timeout_s", timeout),
    ):
        if value is not None:
            if value < 0:
                fail(f"--{name.replace('_', '-')} must be >= 0")
            changes[name] = value or None
    if budget is not None and no_budget:
        fail("give --budget or --no-budget, not both")
    if budget is not None:
        try:
            changes["budget"] = make_budget(budget_unit, budget, budget_period)
        except RegistryError as exc:
            fail(str(exc))
    elif no_budget:
        changes["budget"] = None
    return changes


def _show(policy: LimitPolicy, as_json: bool, head: str) -> None:
    if as_json:
        print(json.dumps(policy.as_dict()))
        return
    console.print(head, highlight=False)
    for k, v in policy.as_dict().items():
        if v is not None:
            console.print(f"  {k}: {v}", highlight=False)


def _apply(
    ctx: typer.Context,
    scope: Scope,
    scope_id: str,
    changes: dict[str, Any],
    clear: bool,
    models: list[str] | None = UNSET,
) -> LimitPolicy:
    accounts = stores(ctx).accounts
    try:
        policy = accounts.set_limits(Who.cli(), scope, scope_id, changes, clear=clear)
        if models is not UNSET:
            accounts.set_models(Who.cli(), scope_id, models)
    except RegistryError as exc:
        fail(str(exc))
    return policy


@tenants_app.command("set-limits")
def tenants_set_limits(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    rpm: Annotated[int | None, Opt(help=f"Requests per minute. {ZERO}")] = None,
    tpm: Annotated[int | None, Opt(help=f"Tokens per minute (worst case held at admission). {ZERO}")] = None,
    budget: Annotated[
        str | None, Opt(help="Budget amount: tokens, or money in the tenant's currency.")
    ] = None,
    budget_unit: Annotated[str, Opt(help="tokens or money.")] = "tokens",
    budget_period: Annotated[str, Opt(help="month (calendar month, UTC) or prepaid (a balance).")] = "month",
    no_budget: Annotated[bool, Opt("--no-budget", help="Remove the budget.")] = False,
    max_tokens: Annotated[
        int | None, Opt(help=f"Maximum max_tokens per request (also injected). {ZERO}")
    ] = None,
    max_prompt_tokens: Annotated[int | None, Opt(help=f"Maximum prompt length in tokens. {ZERO}")] = None,
    timeout: Annotated[int | None, Opt(help=f"Request timeout in seconds. {ZERO}")] = None,
    models: Annotated[str | None, Opt(help="Allowed models, comma-separated ('*' = every model).")] = None,
    content_logging: Annotated[
        bool | None,
        Opt("--content-logging/--no-content-logging", help="Store prompts and completions (off by default)."),
    ] = None,
    retention_days: Annotated[int | None, Opt(help="Content log retention in days.")] = None,
    clear: Annotated[bool, Opt("--clear", help="Remove every limit first (back to the defaults).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set a tenant's rate limits, budget, caps, allowed models and content logging (audited)."""
    changes = _changes(
        rpm, tpm, max_tokens, max_prompt_tokens, timeout, budget, budget_unit, budget_period, no_budget
    )
    if content_logging is not None:
        changes["content_logging"] = content_logging
    if retention_days is not None:
        changes["content_retention_days"] = retention_days or None
    allowed: list[str] | None = UNSET
    if models is not None:
        allowed = None if models.strip() == "*" else [m.strip() for m in models.split(",") if m.strip()]
    policy = _apply(ctx, "tenant", tenant, changes, clear, allowed)
    _show(policy, as_json, f"limits of tenant [bold]{tenant}[/bold]:")


@tenants_app.command("top-up")
def tenants_top_up(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    amount: Annotated[str, Opt(help="Added to the prepaid balance (tokens or money).")],
    as_json: JsonOpt = False,
) -> None:
    """Add to a tenant's prepaid budget (audited)."""
    try:
        policy = stores(ctx).accounts.top_up(Who.cli(), tenant, amount)
    except RegistryError as exc:
        fail(str(exc))
    _show(policy, as_json, f"limits of tenant [bold]{tenant}[/bold]:")


@tenants_app.command("limits")
def tenants_limits(
    ctx: typer.Context, tenant: Annotated[str, typer.Argument(help="Tenant id.")], as_json: JsonOpt = False
) -> None:
    """Show a tenant's limits and its budget use in the ledger (requests in flight are not included)."""
    s = stores(ctx)
    try:
        t = s.accounts.tenant(tenant)
    except RegistryError as exc:
        fail(str(exc))
    policy = s.limits.get("tenant", tenant) or LimitPolicy()
    out: dict[str, Any] = {
        "tenant_id": tenant,
        "allowed_models": list(t.allowed_models) if t.allowed_models else None,
        "limits": policy.as_dict(),
        "budget_use": None,
    }
    if policy.budget is not None:
        b = policy.budget
        _window, start = b.window(utcnow())
        rows = s.usage.summary(["model"], tenant_id=tenant, start=start)
        used = 0
        pricer = PriceBookPricer(s.prices) if s.prices.available else None  # the one price source
        for r in rows:
            p, c, o = (
                int(str(r["prompt_tokens"])),
                int(str(r["cached_prompt_tokens"])),
                int(str(r["completion_tokens"])),
            )
            if b.unit == "tokens":
                used += p + o
            elif pricer is None:
                fail("no price book: money budgets cannot be computed")
            else:
                try:
                    used += cost_units(
                        pricer,
                        str(r["model"]),
                        t.currency,
                        tenant,
                        input_tokens=p - c,
                        cached_tokens=c,
                        output_tokens=o,
                    )
                except PriceUnavailable as exc:
                    fail(str(exc))
        out["budget_use"] = {
            "since": start.isoformat(),
            "used": b.number(used),
            "limit": b.number(b.limit_units()),
            "unit": "tokens" if b.unit == "tokens" else t.currency,
        }
    if as_json:
        print(json.dumps(out))
        return
    _show(
        policy, False, f"limits of tenant [bold]{tenant}[/bold] (models: {out['allowed_models'] or 'all'}):"
    )
    if out["budget_use"]:
        u = out["budget_use"]
        console.print(
            f"  budget use since {u['since']}: {u['used']} of {u['limit']} {u['unit']}", highlight=False
        )


@keys_app.command("set-limits")
def keys_set_limits(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="Key id (key_...).")],
    rpm: Annotated[int | None, Opt(help=f"Requests per minute for this key. {ZERO}")] = None,
    tpm: Annotated[int | None, Opt(help=f"Tokens per minute for this key. {ZERO}")] = None,
    budget: Annotated[
        str | None, Opt(help="This key's own budget (the tenant's budget still applies).")
    ] = None,
    budget_unit: Annotated[str, Opt(help="tokens or money.")] = "tokens",
    budget_period: Annotated[str, Opt(help="month or prepaid.")] = "month",
    no_budget: Annotated[bool, Opt("--no-budget", help="Remove the key's budget.")] = False,
    max_tokens: Annotated[int | None, Opt(help=f"Maximum max_tokens per request. {ZERO}")] = None,
    clear: Annotated[bool, Opt("--clear", help="Remove the key's own limits first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set one key's own rate limits and budget, on top of its tenant's (audited)."""
    changes = _changes(rpm, tpm, max_tokens, None, None, budget, budget_unit, budget_period, no_budget)
    policy = _apply(ctx, "key", key_id, changes, clear)
    _show(policy, as_json, f"limits of key [bold]{key_id}[/bold]:")


@admin_app.command("audit")
def admin_audit(
    ctx: typer.Context,
    tenant: Annotated[str | None, Opt(help="Only actions on this tenant.")] = None,
    action: Annotated[str | None, Opt(help="Only this action (e.g. key.revoke).")] = None,
    limit: Annotated[int, Opt(help="Newest N entries.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The audit log: who changed what, when, from where (admin API and CLI)."""
    rows = stores(ctx).audit.store.list(tenant_id=tenant, action=action, limit=limit)
    if as_json:
        print(json.dumps([e.as_dict() for e in rows]))
        return
    table = Table("when (UTC)", "actor", "from", "action", "target", "tenant", "outcome")
    for e in rows:
        table.add_row(
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            e.actor,
            f"{e.source}:{e.client or '-'}",
            e.action,
            e.target or "",
            e.tenant_id or "",
            e.outcome,
        )
    console.print(table)


@admin_app.command("purge-content")
def admin_purge_content(ctx: typer.Context) -> None:
    """Delete logged prompts and completions past their retention (gateways also do this every 5 minutes)."""
    from serving.content_log import ContentLogStore

    n = ContentLogStore(stores(ctx).engine).purge()
    console.print(f"purged {n} content log row(s)")
