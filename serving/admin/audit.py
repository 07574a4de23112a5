"""The audit log API (GET /admin/v1/audit): who changed what, when, from where.

serving/audit.py writes it (admin API and CLI).
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Query
from starlette.responses import Response

from serving.deps import AdminDep, AuditDep

router = APIRouter(prefix="/admin/v1", tags=["admin"])


@router.get("/audit")
async def list_audit(
    _admin: AdminDep,
    audit: AuditDep,
    tenant_id: str | None = Query(default=None, max_length=64),
    action: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Response:
    rows = await asyncio.to_thread(audit.store.list, tenant_id=tenant_id, action=action, limit=limit)
    return Response(
        orjson.dumps({"object": "list", "data": [e.as_dict() for e in rows]}), media_type="application/json"
    )
