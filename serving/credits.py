"""Prepaid credit as the admin API and the CLI present it (billing/credits.py keeps the ledger).

A grant and, for a tenant with a prepaid money budget, the same amount added to that budget are one
transaction: the budget guard and the invoices draw on one balance. Audited as `credits.add`.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from billing import credits
from billing.service import BillingService
from serving.accounts import Accounts
from serving.audit import Who


def add_credit(
    svc: BillingService,
    accounts: Accounts,
    who: Who,
    tenant_id: str,
    *,
    kind: str,
    amount: Decimal,
    reference: str,
    expires_on: date | None = None,
) -> dict[str, Any]:
    tenant = accounts.tenant(tenant_id)  # TenantNotFound: 404 / exit 1
    credits.check_grant(kind, amount, tenant.currency, reference, expires_on)
    series = svc.config().seller.numbering

    def grant() -> dict[str, Any]:
        with svc.store.unit() as tx:
            g = credits.grant(
                tx,
                tenant_id=tenant_id,
                currency=tenant.currency,
                kind=kind,
                amount=amount,
                reference=reference,
                expires_on=expires_on,
                series=series,
                now=svc.now(),
            )
            raised = accounts.limits.add_to_prepaid(tx, tenant_id, amount)
        return g.to_json_dict() | {"prepaid_budget_raised": raised}

    return accounts.audit.run(
        who,
        "credits.add",
        grant,
        target=tenant_id,
        tenant_id=tenant_id,
        detail={"kind": kind, "amount": str(amount), "reference": reference},
        describe=lambda r: {"receipt_number": r["receipt_number"]},
    )


def balance(svc: BillingService, accounts: Accounts, tenant_id: str) -> dict[str, Any]:
    tenant = accounts.tenant(tenant_id)
    return svc.credit_balance(tenant_id, tenant.currency)
