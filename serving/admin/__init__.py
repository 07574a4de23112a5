"""The admin API (/admin/v1), behind the admin credential.

Tenants and keys, usage, invoices, reports, the audit log.
"""

from __future__ import annotations

from fastapi import APIRouter

from serving.admin import audit, credits, invoices, reports, tenants, usage

ROUTERS: tuple[APIRouter, ...] = (
    tenants.router,
    audit.router,
    invoices.router,
    credits.router,
    reports.router,
    usage.router,
)
