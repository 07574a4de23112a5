"""Month close: the ledger, the tenants and the billing configs through the pure engine into the store.

``run(period)`` builds or refreshes one draft invoice per tenant (idempotent), ``finalize(period)``
numbers the drafts, ``void(number)`` issues a credit note, ``exports(period)`` reports. The clock
is read here (issue dates, timestamps), never in the engine. Services never commit: every write is
composed here, inside one unit of work (``with self.store.unit() as tx``) that commits when it ends;
the persistence modules only persist, and billing/lifecycle.py says which status may become which.

Which tenants get an invoice for a period P (calendar month, UTC):

* every tenant with token usage in P not billed yet (ledger events with ``seq`` above W(tenant, P));
* every tenant with late usage of an earlier period Q that is closed for it (its Q invoice is
  issued, or Q was finalized for all tenants while it had no draft there): the events of Q with
  ``seq`` above W(tenant, Q) become ``adjustment`` lines;
* every tenant whose price book or contract has a minimum commitment for P, even without usage.

A tenant whose invoice cannot be built (invalid tax id, missing price, FX rate or tax rule) gets an
``error`` row with the reason; the run goes on with the others, and ``finalize`` refuses that tenant
with the same reason until a new run succeeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from billing import (
    credits,
    document_store,
    documents_view,
    engine,
    fx_store,
    guards,
    issuing,
    lifecycle,
    partial_credit,
    period_store,
    price_book,
    receipts_store,
    receivables,
    tax,
)
from billing.document_store import Draft, NotFound, StoredDocument
from billing.documents import CreditNote, Document, Invoice, Withholding, seq_runs
from billing.documents_view import Verification as Verification
from billing.documents_view import document_summary as document_summary
from billing.documents_view import documents_summary as documents_summary
from billing.errors import BillingError, DocumentStateError, FxImportError, InvalidUsage
from billing.fx import FxRate, FxTable, check_rate, corrected, import_csv
from billing.ledger_read import SeqRange, Slice, billed_quantities, event_digest, events_in, rows_of
from billing.lifecycle import PENDING, Op, Status
from billing.parties import Buyer, NumberSeries, Seller, load_seller
from billing.prices import PriceSource
from billing.receipts_store import Receipt
from billing.render.jsondoc import to_json
from billing.reports import ExportReport, GroupBy
from billing.store import BillingStore
from billing.supplies import LateSupply
from metering.clock import Clock, Period, utcnow
from metering.store_sql import UsageStore
from metering.tenants import Tenant, TenantStore


@dataclass(frozen=True, slots=True)
class BillingConfig:
    seller: Seller
    price_book: price_book.PriceBook
    tax_rules: tax.TaxRules
    fx: FxTable


@dataclass
class RunReport:
    period: str
    issue_date: date
    drafts: list[StoredDocument] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (tenant, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class FinalizeReport:
    period: str
    finalized: list[StoredDocument] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    closed: bool = False
    forced: bool = False  # finalized before the period ended (+ grace): the caller audits it


class BillingService:
    def __init__(
        self,
        *,
        store: BillingStore,
        usage: UsageStore,
        tenants: TenantStore,
        config_dir: Path,
        prices: PriceSource,
        clock: Clock = utcnow,
        finalize_grace: timedelta = timedelta(0),
        production: bool = False,
        archive: bool = False,
    ) -> None:
        self.store = store
        self._usage = usage
        self._tenants = tenants
        self._dir = config_dir
        self.prices = prices  # the one price source (billing/prices.py), shared with budgets and spend
        self._clock = clock
        # A period may be finalized from its end + this grace (late events arriving); earlier only with force.
        self.finalize_grace = finalize_grace
        # Production mode issues nothing with the sample issuer or a `sample:` FX rate (billing/guards.py).
        self.production = production
        # Render each issued document's PDF and UBL at finalization (and void) and keep the bytes
        # (billing/documents_view.py); off, they are archived at their first download instead.
        self.archive = archive

    def now(self) -> datetime:
        return self._clock()

    def credit_balance(self, tenant_id: str, currency: str) -> dict[str, Any]:
        """The tenant's prepaid credit today, per kind, and its ledger (billing/credits.py)."""
        with self.store.read() as conn:
            left = credits.balance(conn, tenant_id, currency, self._clock().date())
            rows = credits.grants(conn, tenant_id)
        return {
            "object": "credit_balance",
            "tenant": tenant_id,
            "currency": currency,
            "promotional": str(left["promotional"]),
            "paid": str(left["paid"]),
            "total": str(left["promotional"] + left["paid"]),
            "ledger": [
                {
                    "kind": r["kind"],
                    "amount": r["amount"],
                    "currency": r["currency"],
                    "receipt_number": r["number"],
                    "reference": r["reference"],
                    "expires_on": r["expires_on"].isoformat() if r["expires_on"] else None,
                    "recorded_at": r["recorded_at"].isoformat(),
                }
                for r in rows
            ],
        }

    def receipt(self, number: str, fmt: str = "json") -> bytes:
        """A prepaid-credit receipt as JSON, HTML or PDF (billing/render/receipt.py)."""
        if fmt not in ("json", "html", "pdf"):
            raise InvalidUsage(f"a receipt renders as json, html or pdf, not {fmt!r}")
        with self.store.read() as conn:
            grant = credits.receipt(conn, number)
        if fmt == "json":
            return orjson.dumps(grant, option=orjson.OPT_INDENT_2)
        tenant = self._tenants.get_tenant(grant["tenant"])
        if tenant is None:
            raise NotFound(f"receipt {number}: tenant {grant['tenant']!r} is gone")
        from billing.render.receipt import receipt_html, receipt_pdf

        seller = self.config().seller
        if fmt == "html":
            return receipt_html(grant, seller, buyer_of(tenant)).encode()
        return receipt_pdf(grant, seller, buyer_of(tenant))

    # --- configuration ---------------------------------------------------------------------
    def config(self) -> BillingConfig:
        """Issuer, price book (the shared source, re-read if its file changed), tax rules, and FX =
        configs/billing/fx_rates.csv + imported rates."""
        fx_file = self._dir / "fx_rates.csv"
        try:
            shipped = (
                import_csv(fx_file.read_text(encoding="utf-8"), origin=str(fx_file))
                if fx_file.is_file()
                else []
            )
        except OSError as exc:
            raise FxImportError(f"{fx_file}: cannot read: {exc}") from exc
        return BillingConfig(
            seller=load_seller(self._dir / "issuer.yaml"),
            price_book=self._current_prices(),
            tax_rules=tax.load(self._dir / "tax_rules.yaml"),
            fx=FxTable(corrected(tuple(shipped) + tuple(self.store.fx_rates()), self.store.fx_corrections())),
        )

    def supersede_fx(self, rate: FxRate, *, reason: str) -> FxRate:
        """Correct a wrong rate (shipped or imported) by a superseding row with a reason, never an edit:
        drafts built from now on use it; issued documents keep the rate they recorded. Returns the rate
        it replaces."""
        if not reason.strip():
            raise FxImportError("a correction needs a reason")
        try:
            check_rate(rate.base, rate.quote, rate.rate)
        except ValueError as exc:
            raise FxImportError(f"{rate.base}/{rate.quote} {rate.date}: {exc}") from exc
        current = self.config().fx
        key = (rate.date, rate.base, rate.quote)
        old = next((r for r in current.rates if (r.date, r.base, r.quote) == key), None)
        if old is None:
            raise FxImportError(
                f"no {rate.base}/{rate.quote} rate is stored for {rate.date}: import it "
                "(`tokenport fx import`); a correction supersedes an existing rate"
            )
        FxTable((*(r for r in current.rates if r is not old), rate))  # the inverse check, with it
        with self.store.unit() as tx:
            fx_store.supersede(tx, rate, replaces=old.rate, reason=reason.strip(), now=self._clock())
        return old

    def import_fx(self, text: str, *, origin: str) -> tuple[int, int]:
        """Store the CSV's rates (refusing contradictions); returns (new rates, rates already stored)."""
        rates = import_csv(text, origin=origin)
        self.config().fx.with_rates(rates)  # raises FxImportError on a contradicting rate
        with self.store.unit() as tx:
            added = fx_store.add(tx, rates, origin=origin, now=self._clock())
        return added, len(rates) - added

    def _current_prices(self) -> price_book.PriceBook:
        self.prices.refresh()
        return self.prices.book()

    # --- month close -----------------------------------------------------------------------
    def run(
        self, period: Period, *, tenant_id: str | None = None, issue_date: date | None = None
    ) -> RunReport:
        """Build or refresh the drafts. Their issue date is provisional (``issue_date``, by default the day
        after the period): finalizing dates every invoice the day it is finalized."""
        if issue_date is not None and not period.start <= issue_date <= period.end + timedelta(days=366):
            raise InvalidUsage(
                f"the issue date {issue_date} must fall between the start of {period} and a year"
                " after its end"
            )
        issue = issue_date or period.end + timedelta(days=1)
        return self._run(period, tenant_id, issue)

    def _run(
        self, period: Period, tenant_id: str | None, issue: date, cfg: BillingConfig | None = None
    ) -> RunReport:
        cfg = cfg or self.config()
        report = RunReport(str(period), issue)
        tenants = {t.id: t for t in self._tenants.list_tenants()}
        if tenant_id is not None and tenant_id not in tenants:
            raise NotFound(f"no tenant {tenant_id!r}")
        p = str(period)
        closed = self.store.closed_periods()
        earlier = sorted(q for q in set(closed) | self.store.invoiced_periods() if q < p)
        states = self.store.invoice_states([p, *earlier])
        billed = self.store.billed_through([tenant_id] if tenant_id else None)

        new_slice = self._slices(tenants)
        own, mark = self._read_own(period, tenant_id, billed, new_slice)
        late = self._read_late(earlier, tenant_id, closed, states, billed, new_slice)

        targets = {t for t, s in own.items() if s.quantities} | {t for t, s in late.items() if s.quantities}
        targets |= {t for (t, q), s in states.items() if q == p and s & set(PENDING)}
        targets |= {t.id for t in tenants.values() if self._has_minimum(cfg, t, period)}
        if tenant_id is not None:
            targets &= {tenant_id}
            if not targets:
                report.skipped.append((tenant_id, f"nothing to bill for {p}"))
        all_rows = True
        for t in sorted(targets):
            status = states.get((t, p), set())
            if Status.FINALIZED in status:
                report.skipped.append((t, f"{p} is already invoiced; later usage goes to the next invoice"))
                continue
            if p in closed and not status & set(PENDING) and tenant_id is None:
                why = f"{p} is closed: no new invoices (late usage is billed next period as an adjustment)"
                report.skipped.append((t, why))
                continue
            all_rows &= self._draft(
                cfg, report, period, issue, t, tenants.get(t), own.get(t), late.get(t), billed
            )
        if tenant_id is None and all_rows:
            with self.store.unit() as tx:
                period_store.record_run(tx, p, mark, self._clock())
        return report

    def _slices(self, tenants: dict[str, Tenant]) -> Callable[[str], Slice]:
        """A new billing slice for a tenant, converting its events under its tariff (billing/tariffs.py)."""

        def new(t: str) -> Slice:
            tenant = tenants.get(t)
            if tenant is None or not self.prices.available:
                return Slice()
            return Slice(convert=self.prices.converter(tenant.id, tenant.currency))

        return new

    def _read_own(
        self,
        period: Period,
        tenant_id: str | None,
        billed: dict[tuple[str, str], int],
        new_slice: Callable[[str], Slice] = lambda _t: Slice(),
    ) -> tuple[dict[str, Slice], int]:
        """This period's unbilled events per tenant, and the highest seq the pass saw."""
        p = str(period)
        slices: dict[str, Slice] = {}
        after = billed.get((tenant_id, p), 0) if tenant_id else 0
        mark = 0
        for stored in events_in(self._usage, period, tenant_id=tenant_id, after_seq=after):
            mark = stored.seq
            t = stored.event.tenant_id
            lo = billed.get((t, p), 0)
            if stored.seq > lo:
                (slices.get(t) or slices.setdefault(t, new_slice(t))).add(stored, p, lo)
        return slices, mark

    def _read_late(
        self,
        earlier: list[str],
        tenant_id: str | None,
        closed: dict[str, int],
        states: dict[tuple[str, str], set[str]],
        billed: dict[tuple[str, str], int],
        new_slice: Callable[[str], Slice] = lambda _t: Slice(),
    ) -> dict[str, Slice]:
        """Late usage: unbilled events of earlier periods that are closed for their tenant."""

        def closed_for(t: str, q: str) -> bool:
            status = states.get((t, q), set())
            if Status.FINALIZED in status:
                return True
            # A voided invoice's usage waits for its re-issue (never pulled into a later invoice).
            return Status.VOID not in status and q in closed and not status & set(PENDING)

        slices: dict[str, Slice] = {}
        for q in earlier:
            if tenant_id is not None:
                if not closed_for(tenant_id, q):
                    continue
                rows_there = bool(states.get((tenant_id, q)))
                after = max(billed.get((tenant_id, q), 0), 0 if rows_there else closed.get(q, 0))
            else:
                # The lowest W of the tenants closed there; a tenant without rows in a closed
                # period has no event below the close mark (the last full run saw them all).
                bounds = [
                    billed.get((t, qq), 0)
                    for (t, qq), s in states.items()
                    if qq == q and Status.FINALIZED in s
                ]
                bounds += [closed[q]] if q in closed else []
                after = min(bounds, default=0)
            for stored in events_in(self._usage, Period.parse(q), tenant_id=tenant_id, after_seq=after):
                t = stored.event.tenant_id
                lo = billed.get((t, q), 0)
                if stored.seq > lo and closed_for(t, q):
                    (slices.get(t) or slices.setdefault(t, new_slice(t))).add(stored, q, lo)
        return slices

    def _has_minimum(self, cfg: BillingConfig, tenant: Tenant, period: Period) -> bool:
        try:
            start, end = cfg.price_book.spans(
                currency=tenant.currency, period_start=period.start, period_end=period.end
            )[-1]
            prices = cfg.price_book.select(
                currency=tenant.currency, period_start=start, period_end=end, tenant_id=tenant.id
            )
        except BillingError:
            return False
        return prices.minimum_commitment is not None and prices.minimum_commitment > 0

    def _draft(
        self,
        cfg: BillingConfig,
        report: RunReport,
        period: Period,
        issue: date,
        t: str,
        tenant: Tenant | None,
        own: Slice | None,
        late: Slice | None,
        billed: dict[tuple[str, str], int],
    ) -> bool:
        p, now = str(period), self._clock()
        own, late = own or Slice(), late or Slice()
        if tenant is None:
            message = f"usage for unknown tenant {t!r}: create the tenant, then run again"
            issuing.save_pending(self.store, t, p, message, (), now)
            report.errors.append((t, message))
            return True
        try:
            supplies = [
                LateSupply(
                    q.start,
                    q.end,
                    tokens,
                    billed_quantities(self._usage, t, q, billed.get((t, str(q)), 0), late.convert),
                    {d: n for d, n in late.by_day.items() if q.start <= d <= q.end},
                )
                for q, tokens in sorted((Period.parse(k), v) for k, v in late.by_period.items())
            ]
            invoice = engine.build_invoice(
                usage=own.billed_rows(),
                late=supplies,
                usage_by_day=own.by_day,
                buyer=buyer_of(tenant),
                seller=cfg.seller,
                price_book=cfg.price_book,
                tax_rules=cfg.tax_rules,
                fx=cfg.fx,
                period_start=period.start,
                period_end=period.end,
                issue_date=issue,
                usage_digest=event_digest(own.hashes + late.hashes),
            )
        except BillingError as exc:
            issuing.save_pending(self.store, t, p, str(exc), (), now)
            report.errors.append((t, str(exc)))
            return True
        invoice = replace(invoice, billed_events=seq_runs(own.tenant_seqs + late.tenant_seqs))
        wht = self._wht().get(invoice.buyer.billing_country)
        if wht is not None and invoice.buyer.business and invoice.total > 0:  # the buyer withholds: say so
            country = invoice.buyer.billing_country
            withholding = Withholding.of(country, wht.rate, wht.source, invoice.total, invoice.currency)
            invoice = replace(invoice, withholding=withholding)
        if not invoice.lines:
            issuing.discard_pending(self.store, t, p)
            report.skipped.append((t, f"nothing to bill for {p}"))
            return True
        ranges: list[SeqRange] = [*own.ranges.values(), *late.ranges.values()]
        try:
            row = issuing.save_pending(
                self.store,
                t,
                p,
                Draft(
                    tenant_id=t,
                    period=p,
                    document=to_json(invoice),
                    currency=invoice.currency,
                    subtotal=invoice.subtotal,
                    tax_total=invoice.tax_total,
                    total=invoice.total,
                    issue_date=issue,
                    usage_rows=rows_of(own.rows()),
                    adjustment_rows=rows_of(late.rows()),
                    usage_digest=invoice.usage_digest,
                    event_count=own.events + late.events,
                    ranges=ranges,
                ),
                ranges,
                now,
            )
        except DocumentStateError as exc:
            report.errors.append((t, str(exc)))
            return False
        report.drafts.append(row)
        return True

    def finalize(
        self, period: Period, *, tenant_id: str | None = None, force: bool = False
    ) -> FinalizeReport:
        """Number every draft of the period (or one tenant's), dated today; refuse error rows with their
        reason.

        A period is finalized once it has ended, from its end + ``finalize_grace``; ``force=True`` closes a
        running period early (the report says so: the caller audits it). Every invoice is issued the day it is
        finalized: a draft dated another day is rebuilt for today first (tax point, FX and due date follow).
        """
        p = str(period)
        report = FinalizeReport(p, forced=force)
        now = self._clock()
        today = now.date()
        if period.start > today:
            raise DocumentStateError(f"{p} has not started yet: nothing can be finalized for it")
        opens = period.end_at + self.finalize_grace
        if now < opens and not force:
            raise DocumentStateError(
                f"{p} is still open: it can be finalized from {opens:%Y-%m-%d %H:%M} UTC"
                " (force it to close early)"
            )
        if tenant_id is None and p not in self.store.closed_periods() and not self.store.was_run(p):
            raise DocumentStateError(
                f"{p} has not been run for all tenants: run `tokenport invoices run --period {p}` first"
            )
        cfg = self.config()
        if self.production:
            guards.refuse_sample_issuer(cfg.seller)
        series = cfg.seller.numbering
        pending = self.store.find(period=p, tenant_id=tenant_id, kinds=["invoice"], statuses=PENDING)
        if tenant_id is not None and not pending:
            raise DocumentStateError(
                f"{tenant_id} has no draft for {p}: run `tokenport invoices run"
                f" --period {p} --tenant {tenant_id}` first"
            )
        for row in pending:
            if row.status == "draft" and row.issue_date != today:
                redated = self._redate(period, row, today, cfg)
                if redated is None:
                    report.refused.append((row.tenant_id, f"nothing left to bill for {p}"))
                    continue
                row = redated
            if row.status == "error":
                report.refused.append((row.tenant_id, f"cannot finalize: {row.error}"))
                continue
            sample = guards.sample_rates(row.document) if self.production else None
            if sample:
                report.refused.append((row.tenant_id, sample))
                continue
            try:
                report.finalized.append(self.finalize_document(row.id, series))
            except DocumentStateError as exc:
                report.refused.append((row.tenant_id, str(exc)))
        if tenant_id is None:
            with self.store.unit() as tx:
                period_store.close(tx, p, self._clock())
            report.closed = True
        return report

    def _redate(
        self, period: Period, row: StoredDocument, today: date, cfg: BillingConfig
    ) -> StoredDocument | None:
        """The tenant's draft rebuilt with today's issue date (the ledger read again); None: nothing left.

        Only tenants with a draft are rebuilt: finalize numbers what a run drafted, never a tenant no run
        saw."""
        self._run(period, row.tenant_id, today, cfg)
        found = self.store.find(
            period=row.period, tenant_id=row.tenant_id, kinds=["invoice"], statuses=PENDING
        )
        return found[0] if found else None

    def finalize_document(self, document_id: int, series: NumberSeries | None = None) -> StoredDocument:
        """Number one draft (see billing/issuing.py), then archive its PDF and UBL."""
        row = issuing.finalize_draft(
            self.store, document_id, series or self.config().seller.numbering, now=self._clock()
        )
        if self.archive:
            documents_view.archive_issued(self.store, row.ref, self._clock())
        return row

    def void(
        self, number: str, *, reason: str, issue_date: date | None = None
    ) -> tuple[StoredDocument, StoredDocument]:
        """Void a finalized invoice: a credit note reversing it exactly, numbered in its own series."""
        row = self.store.get(number)
        lifecycle.transition(row.kind, row.status, Op.VOID, what=number)
        assert row.document is not None
        invoice = Invoice.from_json_dict(row.document)
        issue = issue_date or max(self._clock().date(), invoice.issue_date)
        credit = engine.build_credit_note(invoice, reason=reason, issue_date=issue)
        voided, note = issuing.void_invoice(
            self.store,
            row.id,
            credit,
            reason=reason,
            series=self.config().seller.numbering,
            now=self._clock(),
        )
        if self.archive:  # the VOID-marked invoice and its credit note, as issued
            for ref in (voided.ref, note.ref):
                documents_view.archive_issued(self.store, ref, self._clock())
        return voided, note

    def credit(
        self,
        number: str,
        *,
        reason: str,
        lines: list[int] | None = None,
        amount: Decimal | None = None,
        issue_date: date | None = None,
    ) -> StoredDocument:
        """A partial credit note (some lines, or a net amount) of a finalized invoice; the invoice stays
        finalized and the credit notes never exceed it (billing/partial_credit.py)."""
        row = self.store.get(number)
        lifecycle.transition(row.kind, row.status, Op.CREDIT, what=number)
        assert row.document is not None
        invoice = Invoice.from_json_dict(row.document)
        issue = issue_date or max(self._clock().date(), invoice.issue_date)

        def build(prior: list[CreditNote]) -> CreditNote:
            return partial_credit.partial_credit_note(
                invoice, reason=reason, issue_date=issue, lines=lines, amount=amount, prior=prior
            )

        note = issuing.credit_invoice(
            self.store, row.id, build, series=self.config().seller.numbering, now=self._clock()
        )
        if self.archive:
            documents_view.archive_issued(self.store, note.ref, self._clock())
        return note

    # --- receivables -------------------------------------------------------------------------
    def _wht(self) -> Mapping[str, Any]:
        return receivables.load_withholding(self._dir / "withholding.yaml")

    def receivable(self, number: str) -> receivables.Receivable:
        row = self.store.get(number)
        if row.kind != "invoice" or row.status not in ("finalized", "void"):
            raise DocumentStateError(f"{number} is not an issued invoice")
        with self.store.read() as conn:
            credited = document_store.credited(conn, row.id)
            got = receipts_store.of(conn, [row.id])
        return receivables.receivable(row, credited, got, self._clock().date(), self._wht())

    def pay(
        self,
        number: str,
        *,
        amount: Decimal,
        on: date,
        reference: str,
        withheld: Decimal = Decimal(0),
        certificate: str | None = None,
    ) -> receivables.Receivable:
        """Record a payment (net of any tax the buyer withheld, with its certificate)."""
        row = self.store.get(number)
        if not reference.strip():
            raise InvalidUsage("a payment needs its bank reference")
        receipt = Receipt(row.id, "payment", amount, withheld, on, reference.strip(), certificate)
        return receivables.record(
            self.store, row, receipt, today=self._clock().date(), wht=self._wht(), now=self._clock()
        )

    def write_off(self, number: str, *, reason: str) -> receivables.Receivable:
        """Write off what is still outstanding (a bad debt), with the reason."""
        current = self.receivable(number)
        if not reason.strip():
            raise InvalidUsage("a write-off needs a reason")
        if current.outstanding <= 0:
            raise DocumentStateError(f"{number} has nothing outstanding")
        row = self.store.get(number)
        receipt = Receipt(
            row.id, "write_off", current.outstanding, Decimal(0), self._clock().date(), reason, None
        )
        return receivables.record(
            self.store, row, receipt, today=self._clock().date(), wht=self._wht(), now=self._clock()
        )

    def aging(self, as_of: date | None = None) -> list[dict[str, Any]]:
        """Outstanding amounts per tenant and currency, by days past due."""
        day = as_of or self._clock().date()
        rows = [r for r in self.store.find(kinds=["invoice"], statuses=["finalized"])]
        with self.store.read() as conn:
            credits = {r.id: document_store.credited(conn, r.id) for r in rows}
            got = receipts_store.of(conn, [r.id for r in rows]) if rows else []
        wht = self._wht()
        items = [
            receivables.receivable(r, credits[r.id], [x for x in got if x.document_id == r.id], day, wht)
            for r in rows
        ]
        return receivables.aging(items, day)

    def reissue(self, number: str) -> StoredDocument:
        """Bill a voided invoice's usage again: a new invoice for its tenant and period, with today's tenant
        data, prices of that period, today's date and the next number. Returns the new finalized invoice."""
        row = self.store.get(number)
        lifecycle.transition(row.kind, row.status, Op.REISSUE, what=number)
        period = Period.parse(row.period)
        live = self.store.find(
            tenant_id=row.tenant_id, period=row.period, kinds=["invoice"], statuses=["finalized"]
        )
        if live:
            raise DocumentStateError(
                f"{number}: {row.tenant_id} {row.period} is already invoiced ({live[0].number})"
            )
        report = self._run(period, row.tenant_id, self._clock().date())
        if not report.drafts:
            why = "; ".join(r for _, r in report.errors + report.skipped) or "nothing to bill"
            raise DocumentStateError(f"{number}: cannot re-issue {row.tenant_id} {row.period}: {why}")
        done = self.finalize(
            period, tenant_id=row.tenant_id, force=True
        )  # the period has ended: it was invoiced
        if not done.finalized:
            raise DocumentStateError(f"{number}: cannot re-issue: {'; '.join(r for _, r in done.refused)}")
        return done.finalized[0]

    # --- documents and reports (billing/documents_view.py) -------------------------------------
    def document(self, row: StoredDocument) -> Document:
        return documents_view.document(row)

    def render(self, ref: str, fmt: str, *, tenant_id: str | None = None) -> bytes:
        """The document in json | csv | html | pdf | ubl. A finalized document's JSON is the stored bytes."""
        return documents_view.render_document(self.store, ref, fmt, tenant_id=tenant_id)

    def verify(self, number: str) -> Verification:
        """Recompute an invoice's usage digest and quantities from the ledger events it recorded."""
        return documents_view.verify(self.store, self._usage, number)

    def exports(self, period: Period, *, by: GroupBy | str = GroupBy.COUNTRY) -> ExportReport:
        """Token export volume and revenue (CNY at the recorded rates) of the period's issued documents."""
        return documents_view.exports(self.store, period, by=by)


def buyer_of(tenant: Tenant) -> Buyer:
    return Buyer(
        id=tenant.id,
        name=tenant.name,
        billing_country=tenant.billing_country,
        tax_id=tenant.tax_id,
        business=tenant.business,
        currency=tenant.currency,
        language=tenant.language or "en",
    )
