"""`tokenport tenants set-limits | limits | top-up`, `tokenport keys set-limits` and `tokenport admin
audit | purge-content`: limits, budgets and the audit log from the command line (all changes audited).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from metering.db import make_engine
from metering.tenants import RegistryError
from serving.admin.audit import Who
from serving.audit_store import AuditStore
from serving.cli_accounts import JsonOpt, _settings, auditor, fail, keys_app, open_stores, tenants_app
from serving.limits.policy import LimitPolicy
from serving.limits.pricing import PriceBookPricer, PriceUnavailable, cost_units
from serving.limits.store import LimitsStore, Scope, make_budget

admin_app = typer.Typer(help="Admin: the audit log and data retention.", no_args_is_help=True)
console = Console()
Opt = typer.Option
ZERO = "0 removes the limit."


def _limits(ctx: typer.Context) -> LimitsStore:
    return LimitsStore(make_engine(_settings(ctx).db_url))


def _changes(rpm: int | None, tpm: int | None, max_tokens: int | None, max_prompt_tokens: int | None,
             timeout: int | None, budget: str | None, budget_unit: str, budget_period: str,
             no_budget: bool) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name, value in (("rpm", rpm), ("tpm", tpm), ("max_tokens", max_tokens),
                        ("max_prompt_tokens", max_prompt_tokens), ("request_timeout_s", timeout)):
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


def _apply(ctx: typer.Context, scope: Scope, scope_id: str, changes: dict[str, Any], clear: bool) -> LimitPolicy:
    store = _limits(ctx)
    tenant_id = None
    try:
        tenant_id = store.tenant_of(scope, scope_id)

        def change() -> LimitPolicy:
            if clear:
                store.clear(scope, scope_id)
            return store.update(scope, scope_id, **changes) if changes else (store.get(scope, scope_id)
                                                                             or LimitPolicy())

        detail = {k: (v.as_dict() if isinstance(v, LimitPolicy) else
                      ({"unit": v.unit, "amount": f"{v.amount:f}", "period": v.period} if hasattr(v, "unit") else v))
                  for k, v in changes.items()}
        return auditor(ctx).run(Who.cli(), f"{scope}.limits", change, target=scope_id, tenant_id=tenant_id,
                                detail={**detail, "clear": clear})
    except RegistryError as exc:
        fail(str(exc))
        raise


@tenants_app.command("set-limits")
def tenants_set_limits(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    rpm: Annotated[int | None, Opt(help=f"Requests per minute. {ZERO}")] = None,
    tpm: Annotated[int | None, Opt(help=f"Tokens per minute (worst case held at admission). {ZERO}")] = None,
    budget: Annotated[str | None, Opt(help="Budget amount: tokens, or money in the tenant's currency.")] = None,
    budget_unit: Annotated[str, Opt(help="tokens or money.")] = "tokens",
    budget_period: Annotated[str, Opt(help="month (calendar month, UTC) or prepaid (a balance).")] = "month",
    no_budget: Annotated[bool, Opt("--no-budget", help="Remove the budget.")] = False,
    max_tokens: Annotated[int | None, Opt(help=f"Maximum max_tokens per request (also injected). {ZERO}")] = None,
    max_prompt_tokens: Annotated[int | None, Opt(help=f"Maximum prompt length in tokens. {ZERO}")] = None,
    timeout: Annotated[int | None, Opt(help=f"Request timeout in seconds. {ZERO}")] = None,
    models: Annotated[str | None, Opt(help="Allowed models, comma-separated ('*' = every model).")] = None,
    content_logging: Annotated[bool | None, Opt("--content-logging/--no-content-logging",
                                                help="Store prompts and completions (off by default).")] = None,
    retention_days: Annotated[int | None, Opt(help="Content log retention in days.")] = None,
    clear: Annotated[bool, Opt("--clear", help="Remove every limit first (back to the defaults).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set a tenant's rate limits, budget, caps, allowed models and content logging (audited)."""
    changes = _changes(rpm, tpm, max_tokens, max_prompt_tokens, timeout, budget, budget_unit, budget_period,
                       no_budget)
    if content_logging is not None:
        changes["content_logging"] = content_logging
    if retention_days is not None:
        changes["content_retention_days"] = retention_days or None
    policy = _apply(ctx, "tenant", tenant, changes, clear)
    if models is not None:
        tenants, _ = open_stores(ctx)
        allowed = None if models.strip() == "*" else [m.strip() for m in models.split(",") if m.strip()]
        auditor(ctx).run(Who.cli(), "tenant.models", lambda: tenants.set_allowed_models(tenant, allowed),
                         target=tenant, tenant_id=tenant, detail={"allowed_models": allowed})
    _show(policy, as_json, f"limits of tenant [bold]{tenant}[/bold]:")


@tenants_app.command("top-up")
def tenants_top_up(ctx: typer.Context, tenant: Annotated[str, typer.Argument(help="Tenant id.")],
                   amount: Annotated[str, Opt(help="Added to the prepaid balance (tokens or money).")],
                   as_json: JsonOpt = False) -> None:
    """Add to a tenant's prepaid budget (audited)."""
    store = _limits(ctx)
    try:
        policy = auditor(ctx).run(Who.cli(), "tenant.budget.top_up", lambda: store.top_up("tenant", tenant, amount),
                                  target=tenant, tenant_id=tenant, detail={"amount": amount})
    except RegistryError as exc:
        fail(str(exc))
        return
    _show(policy, as_json, f"limits of tenant [bold]{tenant}[/bold]:")


@tenants_app.command("limits")
def tenants_limits(ctx: typer.Context, tenant: Annotated[str, typer.Argument(help="Tenant id.")],
                   as_json: JsonOpt = False) -> None:
    """Show a tenant's limits and its budget use in the ledger (requests in flight are not included)."""
    tenants, usage = open_stores(ctx)
    t = tenants.get_tenant(tenant)
    if t is None:
        fail(f"tenant {tenant!r} does not exist")
        return
    policy = _limits(ctx).get("tenant", tenant) or LimitPolicy()
    out: dict[str, Any] = {"tenant_id": tenant, "allowed_models": list(t.allowed_models) if t.allowed_models
                           else None, "limits": policy.as_dict(), "budget_use": None}
    if policy.budget is not None:
        b = policy.budget
        _window, start = b.window(datetime.now(UTC))
        rows = usage.summary(["model"], tenant_id=tenant, start=start)
        used = 0
        settings = _settings(ctx)
        path = settings.limits.price_book
        pricer = PriceBookPricer.from_file(path if path.is_absolute() else settings.config_dir / path)
        for r in rows:
            p, c, o = (int(str(r["prompt_tokens"])), int(str(r["cached_prompt_tokens"])),
                       int(str(r["completion_tokens"])))
            if b.unit == "tokens":
                used += p + o
            elif pricer is None:
                fail("no price book: money budgets cannot be computed")
            else:
                try:
                    used += cost_units(pricer, str(r["model"]), t.currency, tenant, input_tokens=p - c,
                                       cached_tokens=c, output_tokens=o)
                except PriceUnavailable as exc:
                    fail(str(exc))
        out["budget_use"] = {"since": start.isoformat(), "used": b.number(used), "limit": b.number(b.limit_units()),
                             "unit": "tokens" if b.unit == "tokens" else t.currency}
    if as_json:
        print(json.dumps(out))
        return
    _show(policy, False, f"limits of tenant [bold]{tenant}[/bold] (models: {out['allowed_models'] or 'all'}):")
    if out["budget_use"]:
        u = out["budget_use"]
        console.print(f"  budget use since {u['since']}: {u['used']} of {u['limit']} {u['unit']}", highlight=False)


@keys_app.command("set-limits")
def keys_set_limits(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="Key id (key_...).")],
    rpm: Annotated[int | None, Opt(help=f"Requests per minute for this key. {ZERO}")] = None,
    tpm: Annotated[int | None, Opt(help=f"Tokens per minute for this key. {ZERO}")] = None,
    budget: Annotated[str | None, Opt(help="This key's own budget (the tenant's budget still applies).")] = None,
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
def admin_audit(ctx: typer.Context,
                tenant: Annotated[str | None, Opt(help="Only actions on this tenant.")] = None,
                action: Annotated[str | None, Opt(help="Only this action (e.g. key.revoke).")] = None,
                limit: Annotated[int, Opt(help="Newest N entries.")] = 50,
                as_json: JsonOpt = False) -> None:
    """The audit log: who changed what, when, from where (admin API and CLI)."""
    open_stores(ctx)  # migrations
    rows = AuditStore(make_engine(_settings(ctx).db_url)).list(tenant_id=tenant, action=action, limit=limit)
    if as_json:
        print(json.dumps([e.as_dict() for e in rows]))
        return
    table = Table("when (UTC)", "actor", "from", "action", "target", "tenant", "outcome")
    for e in rows:
        table.add_row(e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, f"{e.source}:{e.client or '-'}", e.action,
                      e.target or "", e.tenant_id or "", e.outcome)
    console.print(table)


@admin_app.command("purge-content")
def admin_purge_content(ctx: typer.Context) -> None:
    """Delete logged prompts and completions past their retention (gateways also do this every 5 minutes)."""
    from serving.content_log import ContentLogStore

    open_stores(ctx)
    n = ContentLogStore(make_engine(_settings(ctx).db_url)).purge()
    console.print(f"purged {n} content log row(s)")
