"""The tenant's own usage (/v1/usage), with an API key: totals, and the events with their hashes.

    GET /v1/usage?start=...&end=...&group_by=model,origin_country,language
        token totals of the calling tenant only, grouped by any of model, origin_country,
        origin_source, language, outcome, key_id, serving_region, endpoint
    GET /v1/usage/events?start=...&end=...&after=TENANT_SEQ&limit=N
        the tenant's events in ledger order with `tenant_seq` (the event's position among the
        tenant's own events: the global `seq` would count other tenants' requests), `prev_hash`
        and `hash`: every field the hash covers, in canonical form, so the tenant can recompute
        each hash and add up the tokens without trusting us (`tokenport usage verify --file`)
    GET /v1/usage/languages?period=YYYY-MM[&model=M]
        the tenant's own token-tax report: per language and model, tokens per 1,000 characters and
        the premium against English (the admin report's schema, metering/language_report.py)

`start` (inclusive) and `end` (exclusive) filter on when a request started: `YYYY-MM-DD` (00:00 UTC),
an ISO 8601 timestamp, or Unix seconds (serving/dates.py; out of range: 400). Token totals follow
OpenAI's usage: `prompt_tokens` includes `cached_prompt_tokens`; `input_tokens` = prompt - cached.
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Query
from starlette.responses import Response

from metering.clock import Period
from metering.language_report import as_dict, language_report
from metering.store_sql import StoredEvent
from serving.dates import parse_window
from serving.deps import PrincipalDep, UsageDep
from serving.documents_http import PERIOD
from serving.usage_views import TENANT_GROUPS, events_page, iso, parse_groups, totals, usage_row

router = APIRouter(prefix="/v1", tags=["usage"])
JSON = "application/json"


@router.get("/usage")
async def tenant_usage(
    who: PrincipalDep,
    usage: UsageDep,
    start: str | None = Query(default=None, max_length=40),
    end: str | None = Query(default=None, max_length=40),
    group_by: str | None = Query(default=None, max_length=200),
) -> Response:
    s, e = parse_window(start, end)
    groups = parse_groups(group_by, TENANT_GROUPS)
    rows = await asyncio.to_thread(usage.summary, groups, tenant_id=who.tenant.id, start=s, end=e)
    data = [usage_row(row) for row in rows]
    return Response(
        orjson.dumps(
            {
                "object": "usage",
                "tenant_id": who.tenant.id,
                "start": iso(s),
                "end": iso(e),
                "group_by": groups,
                "data": data,
                "totals": totals(data),
            }
        ),
        media_type=JSON,
    )


@router.get("/usage/events")
async def tenant_events(
    who: PrincipalDep,
    usage: UsageDep,
    start: str | None = Query(default=None, max_length=40),
    end: str | None = Query(default=None, max_length=40),
    after: int = Query(default=0, ge=0, le=2**62),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Response:
    s, e = parse_window(start, end)

    def load() -> list[StoredEvent]:
        return list(
            usage.iter_events(
                tenant_id=who.tenant.id, start=s, end=e, after_tenant_seq=after, limit=limit + 1
            )
        )

    events = await asyncio.to_thread(load)
    return Response(
        orjson.dumps({**events_page(events, limit, tenant_view=True), "tenant_id": who.tenant.id}),
        media_type=JSON,
    )


@router.get("/usage/languages")
async def tenant_languages(
    who: PrincipalDep,
    usage: UsageDep,
    period: str = Query(pattern=PERIOD),
    model: str | None = Query(default=None, max_length=128),
) -> Response:
    report = await asyncio.to_thread(
        language_report, usage, Period.parse(period), model=model, tenant_id=who.tenant.id
    )
    return Response(orjson.dumps(as_dict(report)), media_type=JSON)
