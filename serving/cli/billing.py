"""`tokenport invoices`, `tokenport fx` and `tokenport reports`: the month close from the command line.

Exit codes: 0 done; 1 done for some tenants but refused or failed for others (each is named), or a
billing error (the message says what and where); 2 invalid arguments or configuration.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from billing.errors import BillingError
from billing.render import FORMATS
from billing.render.report import REPORT_FORMATS, render_report
from billing.reports import GroupBy
from billing.service import BillingService
from metering.clock import utcnow
from serving.audit import Auditor, Who
from serving.cli.common import JsonOpt, arg, emit, fail, period, stores
from serving.dates import parse_day
from serving.invoicing import (
    credit_json,
    documents_summary,
    finalize_json,
    reissue_json,
    run_json,
    verify_json,
    void_json,
)

invoices_app = typer.Typer(
    help="Invoices and credit notes: run, finalize, void, list, show.", no_args_is_help=True
)
fx_app = typer.Typer(
    help="FX rates used by billing (configs/billing/fx_rates.csv + imported).", no_args_is_help=True
)
reports_app = typer.Typer(help="Token export reports from issued invoices.", no_args_is_help=True)
console = Console(stderr=True)
PeriodOpt = Annotated[str, typer.Option("--period", help="Billing period: a calendar month in UTC, YYYY-MM.")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")]


def _service(ctx: typer.Context) -> BillingService:
    return stores(ctx).billing


def _both(ctx: typer.Context) -> tuple[BillingService, Auditor]:
    """The billing service and the audit log (CLI changes are audited: actor = OS user, source = cli)."""
    s = stores(ctx)
    return s.billing, s.audit


T = TypeVar("T")


def _fail(message: str, code: int = 1) -> NoReturn:
    fail(message, code, console)


def _audited(
    audit: Auditor,
    action: str,
    fn: Callable[[], T],
    *,
    target: str | None = None,
    tenant_id: str | None = None,
    detail: dict[str, Any] | None = None,
    describe: Callable[[T], dict[str, Any]] | None = None,
) -> T:
    """Do a billing change through the audit log (as the CLI user); a refusal exits 1 with its message."""
    try:
        return audit.run(
            Who.cli(), action, fn, target=target, tenant_id=tenant_id, detail=detail, describe=describe
        )
    except BillingError as exc:
        _fail(str(exc))


@invoices_app.command("run")
def invoices_run(
    ctx: typer.Context,
    period_: PeriodOpt,
    tenant: TenantOpt = None,
    issue_date: Annotated[
        str | None, typer.Option(help="Issue date YYYY-MM-DD (default: the first day after the period).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or refresh the draft invoices of a period (idempotent); per-tenant errors are listed."""
    svc, audit = _both(ctx)
    p, day = period(period_), arg(lambda: parse_day(issue_date, "--issue-date"))
    report = _audited(
        audit,
        "invoices.run",
        lambda: svc.run(p, tenant_id=tenant, issue_date=day),
        target=str(p),
        tenant_id=tenant,
        detail={"issue_date": issue_date},
        describe=lambda r: {"drafts": len(r.drafts), "errors": r.errors},
    )
    if as_json:
        emit(run_json(report))
    else:
        for row in report.drafts:
            console.print(
                f"draft {row.ref}: {row.total} {row.currency} ({row.event_count} events)", highlight=False
            )
        for t, reason in report.skipped:
            console.print(f"skipped {t}: {reason}", highlight=False)
        for t, error in report.errors:
            console.print(f"[red]error[/red] {t}: {error}", highlight=False, soft_wrap=True)
        console.print(
            f"{report.period}: {len(report.drafts)} draft(s), {len(report.errors)} error(s), "
            f"issue date {report.issue_date}",
            highlight=False,
        )
    if report.errors:
        raise typer.Exit(1)


@invoices_app.command("finalize")
def invoices_finalize(
    ctx: typer.Context,
    period_: PeriodOpt,
    tenant: TenantOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Finalize before the period has ended (+ billing.finalize_grace_days); audited."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Number the drafts (gapless) and store them immutably; without --tenant also closes the period.
    Refused until the period has ended (plus `billing.finalize_grace_days`) unless --force."""
    svc, audit = _both(ctx)
    p = period(period_)
    report = _audited(
        audit,
        "invoices.finalize",
        lambda: svc.finalize(p, tenant_id=tenant, force=force),
        target=str(p),
        tenant_id=tenant,
        detail={"force": force},
        describe=lambda r: {
            "numbers": [d.number for d in r.finalized],
            "refused": r.refused,
            "forced": r.forced,
        },
    )
    if as_json:
        emit(finalize_json(report))
    else:
        for row in report.finalized:
            console.print(
                f"finalized {row.number} for {row.tenant_id}: {row.total} {row.currency}", highlight=False
            )
        for t, error in report.refused:
            console.print(f"[red]refused[/red] {t}: {error}", highlight=False, soft_wrap=True)
        if report.closed:
            console.print(f"{report.period} closed: later usage of this month goes on the next invoice")
    if report.refused:
        raise typer.Exit(1)


@invoices_app.command("void")
def invoices_void(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="Invoice number.")],
    reason: Annotated[str, typer.Option(help="Why the invoice is voided (printed on the credit note).")],
    issue_date: Annotated[str | None, typer.Option(help="Credit note date (default: today).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Void a finalized invoice by issuing a credit note that reverses it."""
    svc, audit = _both(ctx)
    day = arg(lambda: parse_day(issue_date, "--issue-date"))
    invoice, credit = _audited(
        audit,
        "invoices.void",
        lambda: svc.void(number, reason=reason, issue_date=day),
        target=number,
        detail={"reason": reason, "issue_date": issue_date},
        describe=lambda res: {"tenant": res[0].tenant_id, "credit_note": res[1].number},
    )
    if as_json:
        emit(void_json(invoice, credit))
    else:
        console.print(
            f"voided {invoice.number}; credit note {credit.number} ({credit.total} {credit.currency})",
            highlight=False,
        )


@invoices_app.command("credit")
def invoices_credit(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="A finalized invoice's number.")],
    reason: Annotated[str, typer.Option(help="Why (printed on the credit note).")],
    amount: Annotated[str | None, typer.Option(help="A net amount (before tax) to credit.")] = None,
    lines: Annotated[str | None, typer.Option(help="Line numbers to credit, as printed: 1,3.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A partial credit note: some lines, or a net amount spread over the lines (tax recomputed at the
    invoice's rates). The invoice stays issued; its credit notes never add up to more than it."""
    svc, audit = _both(ctx)
    try:
        chosen = [int(x) for x in lines.split(",") if x.strip()] if lines is not None else None
        value = Decimal(amount) if amount is not None else None
    except (ValueError, ArithmeticError):
        _fail("--lines takes numbers like 1,3 and --amount a decimal like 12.50", 2)
        return
    note = _audited(
        audit,
        "invoices.credit",
        lambda: svc.credit(number, reason=reason, lines=chosen, amount=value),
        target=number,
        detail={"reason": reason, "lines": chosen, "amount": amount},
        describe=lambda r: {"tenant": r.tenant_id, "credit_note": r.number, "total": str(r.total)},
    )
    if as_json:
        emit(credit_json(number, note))
    else:
        console.print(f"credited {number}: {note.number} ({note.total} {note.currency})", highlight=False)


@invoices_app.command("pay")
def invoices_pay(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="A finalized invoice's number.")],
    amount: Annotated[str, typer.Option(help="Amount received, in the invoice's currency.")],
    on: Annotated[str, typer.Option("--date", help="Day received, YYYY-MM-DD.")],
    reference: Annotated[str, typer.Option(help="The bank's reference of the payment.")],
    wht_amount: Annotated[str | None, typer.Option(help="Tax the buyer withheld (SA, UZ, PK, IN).")] = None,
    wht_certificate: Annotated[str | None, typer.Option(help="The buyer's withholding certificate.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Record a payment against an invoice (audited; never more than is outstanding)."""
    svc, audit = _both(ctx)
    day = arg(lambda: parse_day(on, "--date"))
    try:
        paid, withheld = Decimal(amount), Decimal(wht_amount or "0")
    except ArithmeticError:
        _fail("--amount and --wht-amount are decimals like 120.50", 2)
        return
    if day is None:
        _fail("--date is required", 2)
        return
    r = _audited(
        audit,
        "invoices.pay",
        lambda: svc.pay(
            number,
            amount=paid,
            on=day,
            reference=reference,
            withheld=withheld,
            certificate=wht_certificate,
        ),
        target=number,
        detail={"amount": amount, "date": on, "reference": reference, "wht_amount": wht_amount},
        describe=lambda res: {"status": res.status, "outstanding": str(res.outstanding)},
    )
    if as_json:
        emit(r.to_json_dict())
    else:
        console.print(f"{number}: {r.status}, {r.outstanding} {r.currency} outstanding", highlight=False)


@invoices_app.command("write-off")
def invoices_write_off(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="A finalized invoice's number.")],
    reason: Annotated[str, typer.Option(help="Why it will not be paid.")],
    as_json: JsonOpt = False,
) -> None:
    """Write off what is outstanding on an invoice (audited)."""
    svc, audit = _both(ctx)
    r = _audited(
        audit,
        "invoices.write_off",
        lambda: svc.write_off(number, reason=reason),
        target=number,
        detail={"reason": reason},
    )
    if as_json:
        emit(r.to_json_dict())
    else:
        console.print(f"{number}: written off", highlight=False)


@invoices_app.command("status")
def invoices_status(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="An issued invoice's number.")],
    as_json: JsonOpt = False,
) -> None:
    """Payment status: due, received, withheld, written off, outstanding."""
    svc = _service(ctx)
    try:
        r = svc.receivable(number)
    except BillingError as exc:
        _fail(str(exc))
        return
    if as_json:
        emit(r.to_json_dict())
    else:
        console.print(
            f"{number}: {r.status}, {r.outstanding} of {r.due} {r.currency} outstanding", highlight=False
        )


@invoices_app.command("aging")
def invoices_aging(
    ctx: typer.Context,
    as_of: Annotated[str | None, typer.Option(help="Day to age at, YYYY-MM-DD (default today).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Outstanding amounts per tenant and currency: current, 1-30, 31-60, 61-90, 90+ days past due."""
    svc = _service(ctx)
    day = arg(lambda: parse_day(as_of, "--as-of"))
    rows = svc.aging(day)
    if as_json:
        emit({"object": "aging", "as_of": (day or utcnow().date()).isoformat(), "data": rows})
        return
    table = Table("tenant", "currency", "current", "1-30", "31-60", "61-90", "90+", "total")
    for r in rows:
        table.add_row(
            *(str(r[k]) for k in ("tenant", "currency", "current", "1-30", "31-60", "61-90", "90+", "total"))
        )
    console.print(table)


@invoices_app.command("reissue")
def invoices_reissue(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="A voided invoice's number.")],
    as_json: JsonOpt = False,
) -> None:
    """Bill a voided invoice's usage again with the tenant's current data: a new invoice, dated today."""
    svc, audit = _both(ctx)
    row = _audited(
        audit,
        "invoices.reissue",
        lambda: svc.reissue(number),
        target=number,
        describe=lambda r: {"tenant": r.tenant_id, "invoice": r.number},
    )
    if as_json:
        emit(reissue_json(number, row))
    else:
        console.print(f"re-issued {number} as {row.number} ({row.total} {row.currency})", highlight=False)


@invoices_app.command("list")
def invoices_list(
    ctx: typer.Context,
    period_: Annotated[str | None, typer.Option("--period", help="Only this period (YYYY-MM).")] = None,
    tenant: TenantOpt = None,
    status: Annotated[str | None, typer.Option(help="draft, error, finalized or void.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List invoices and credit notes (drafts are shown as DRAFT-<period>-<tenant>)."""
    svc = _service(ctx)
    rows = svc.store.find(
        period=str(period(period_)) if period_ else None,
        tenant_id=tenant,
        statuses=[status] if status else None,
    )
    if as_json:
        emit(documents_summary(rows))
        return
    table = Table()
    for name in ("number", "tenant", "period", "status", "total", "issued"):
        table.add_column(name, no_wrap=name != "status", justify="right" if name == "total" else "left")
    for r in rows:
        total = f"{r.total} {r.currency}" if r.total is not None else "-"
        table.add_row(
            r.ref, r.tenant_id, r.period, r.status, total, r.issue_date.isoformat() if r.issue_date else ""
        )
    out = Console()
    out.print(table)
    for r in rows:
        if r.error:
            out.print(f"{r.ref}: {r.error}", highlight=False, soft_wrap=True)


@invoices_app.command("show")
def invoices_show(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="Number (or DRAFT-<period>-<tenant> for a draft).")],
    format: Annotated[str, typer.Option("--format", help="json, csv, html, pdf or ubl.")] = "json",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Write a document; a finalized one's JSON is byte for byte the stored document."""
    if format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}", 2)
    svc = _service(ctx)
    try:
        data = svc.render(number, format)
    except BillingError as exc:
        _fail(str(exc))
        return
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        out.write_bytes(data)
        console.print(f"wrote {out} ({len(data)} bytes)", highlight=False)


@invoices_app.command("verify")
def invoices_verify(
    ctx: typer.Context,
    number: Annotated[str, typer.Argument(help="Invoice number.")],
    as_json: JsonOpt = False,
) -> None:
    """Recompute an invoice's usage digest and quantities from the ledger events it recorded."""
    svc = _service(ctx)
    try:
        result = svc.verify(number)
    except BillingError as exc:
        _fail(str(exc))
        return
    if as_json:
        emit(verify_json(result))
    else:
        console.print(f"{result.number}: {'ok' if result.ok else 'MISMATCH'} ({result.events} events)")
        for p in result.problems:
            console.print(f"  {p}", highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@fx_app.command("import")
def fx_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV: date,base,quote,rate,source.")],
    as_json: JsonOpt = False,
) -> None:
    """Import FX rates (with source and date) into the database; contradicting rates are refused."""
    svc, audit = _both(ctx)
    from billing.fx import read_text

    try:
        text = read_text(file)
    except BillingError as exc:  # unreadable, or not UTF-8
        _fail(str(exc), 2)
        return
    added, known = _audited(
        audit,
        "fx.import",
        lambda: svc.import_fx(text, origin=str(file)),
        target=str(file),
        describe=lambda res: {"imported": res[0], "already_stored": res[1]},
    )
    if as_json:
        emit({"imported": added, "already_stored": known})
    else:
        console.print(f"imported {added} rate(s), {known} already stored", highlight=False)


@fx_app.command("supersede")
def fx_supersede(
    ctx: typer.Context,
    on: Annotated[str, typer.Option("--date", help="The rate's date, YYYY-MM-DD.")],
    base: Annotated[str, typer.Option(help="Base currency (1 base = RATE quote).")],
    quote: Annotated[str, typer.Option(help="Quote currency.")],
    rate: Annotated[str, typer.Option(help="The correct rate.")],
    source: Annotated[str, typer.Option(help="Who published it.")],
    reason: Annotated[str, typer.Option(help="Why the stored rate is wrong (kept with the correction).")],
    as_json: JsonOpt = False,
) -> None:
    """Correct a wrong FX rate by a superseding row with a reason (audited; never an edit). Drafts built
    from now on use it; issued invoices keep the rate they recorded."""
    from billing.fx import FxRate
    from billing.money import check_currency, to_decimal

    svc, audit = _both(ctx)
    day = arg(lambda: parse_day(on, "--date"))
    if day is None:
        _fail("--date is required", 2)
        return
    try:
        new = FxRate(day, check_currency(base), check_currency(quote), to_decimal(rate), source.strip())
    except (ValueError, BillingError) as exc:
        _fail(str(exc), 2)
        return
    old = _audited(
        audit,
        "fx.supersede",
        lambda: svc.supersede_fx(new, reason=reason),
        target=f"{new.base}/{new.quote} {new.date}",
        detail={"rate": rate, "source": source, "reason": reason},
        describe=lambda old: {"supersedes": str(old.rate), "old_source": old.source},
    )
    out = {"date": new.date.isoformat(), "base": new.base, "quote": new.quote, "rate": str(new.rate)}
    out |= {"source": new.source, "supersedes": str(old.rate), "reason": reason}
    if as_json:
        emit(out)
    else:
        console.print(
            f"{new.base}/{new.quote} {new.date}: {old.rate} superseded by {new.rate}", highlight=False
        )


@fx_app.command("list")
def fx_list(
    ctx: typer.Context,
    on: Annotated[str | None, typer.Option("--date", help="Only this date.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The rates billing uses: the shipped file and the imported ones."""
    svc = _service(ctx)
    day = arg(lambda: parse_day(on, "--date"))
    try:
        rates = [r for r in svc.config().fx.rates if day is None or r.date == day]
    except BillingError as exc:
        _fail(str(exc))
        return
    if as_json:
        emit(
            [
                {
                    "date": r.date.isoformat(),
                    "base": r.base,
                    "quote": r.quote,
                    "rate": format(r.rate, "f"),
                    "source": r.source,
                }
                for r in rates
            ]
        )
        return
    table = Table("date", "base", "quote", "rate", "source")
    for r in rates:
        table.add_row(r.date.isoformat(), r.base, r.quote, format(r.rate, "f"), r.source)
    Console().print(table)


@reports_app.command("exports")
def reports_exports(
    ctx: typer.Context,
    period_: PeriodOpt,
    by: Annotated[
        str,
        typer.Option(
            help="country (origin of the usage), buyer_country (the tenant's), tenant, model or language."
        ),
    ] = "country",
    format: Annotated[str, typer.Option("--format", help="json, csv or html.")] = "json",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Token export volume and revenue (CNY at the recorded rates) of a period's issued invoices."""
    if by not in {g.value for g in GroupBy}:
        _fail(f"--by must be one of {', '.join(g.value for g in GroupBy)}", 2)
    if format not in REPORT_FORMATS:
        _fail(f"--format must be one of {', '.join(REPORT_FORMATS)}", 2)
    svc = _service(ctx)
    try:
        text = render_report(svc.exports(period(period_), by=by), format)
    except BillingError as exc:
        _fail(str(exc))
        return
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}", highlight=False)
