"""Admin usage API (/admin/v1/usage), behind the admin credential: every tenant, paged.

    GET /admin/v1/usage?start=...&end=...&group_by=tenant,model,origin_country&tenant=ID&limit=100&offset=0
        token totals grouped by any of tenant, model, origin_country, origin_source, language,
        outcome, key_id, serving_region, endpoint, worker_id (default: tenant), in group order;
        `has_more` / `next_offset` page through the groups
    GET /admin/v1/usage/events?tenant=ID&start=...&end=...&after=SEQ&limit=N
        events with their hashes in ledger order; `next_after` is the cursor of the next page,
        `chain_head` the ledger's last (seq, hash) when the page was read

`start` / `end` as in /v1/usage (YYYY-MM-DD, ISO 8601 or Unix seconds; start inclusive, end exclusive).
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Query
from starlette.responses import Response

from metering.store_sql import StoredEvent
from serving.dates import parse_window
from serving.deps import AdminDep, UsageDep
from serving.usage_views import ADMIN_ALIASES, ADMIN_GROUPS, events_page, iso, parse_groups, totals, usage_row

router = APIRouter(prefix="/admin/v1", tags=["admin"])


@router.get("/usage")
async def all_usage(
    _admin: AdminDep,
    usage: UsageDep,
    start: str | None = Query(default=None, max_length=40),
    end: str | None = Query(default=None, max_length=40),
    group_by: str | None = Query(default=None, max_length=200),
    tenant: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10**9),
) -> Response:
    s, e = parse_window(start, end)
    groups = parse_groups(group_by, ADMIN_GROUPS, ADMIN_ALIASES, default=("tenant_id",))
    rows = await asyncio.to_thread(
        usage.summary, groups, tenant_id=tenant, start=s, end=e, limit=limit + 1, offset=offset
    )
    more = len(rows) > limit
    data = [usage_row(row) for row in rows[:limit]]
    return Response(
        orjson.dumps(
            {
                "object": "list",
                "start": iso(s),
                "end": iso(e),
                "group_by": groups,
                "tenant": tenant,
                "data": data,
                "page_totals": totals(data),
                "has_more": more,
                "next_offset": offset + limit if more else None,
            }
        ),
        media_type="application/json",
    )


@router.get("/usage/events")
async def all_events(
    _admin: AdminDep,
    usage: UsageDep,
    tenant: str | None = Query(default=None, max_length=64),
    start: str | None = Query(default=None, max_length=40),
    end: str | None = Query(default=None, max_length=40),
    after: int = Query(default=0, ge=0, le=2**62),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Response:
    s, e = parse_window(start, end)

    def load() -> tuple[list[StoredEvent], tuple[int, str] | None]:
        events = list(usage.iter_events(tenant_id=tenant, start=s, end=e, after_seq=after, limit=limit + 1))
        head_seq = usage.max_seq()
        head = usage.get_seq(head_seq) if head_seq else None
        return events, (head.seq, head.hash) if head is not None else None

    events, head = await asyncio.to_thread(load)
    return Response(orjson.dumps(events_page(events, limit, head)), media_type="application/json")
