"""The tenant's own usage (/v1/usage), with an API key: totals, and the events with their hashes.

    GET /v1/usage?start=...&end=...&group_by=model,origin_country,language
        token totals of the calling tenant only, grouped by any of model, origin_country,
        origin_source, language, outcome, key_id, serving_region, endpoint
    GET /v1/usage/events?start=...&end=...&after=TENANT_SEQ&limit=N
        the tenant's events in ledger order with `tenant_seq` (the event's position among the
        tenant's own events: the global `seq` would count other tenants' requests), `prev_hash`
        and `hash`: every field the hash covers, in canonical form, so the tenant can recompute
        each hash and add up the tokens without trusting us (`tokenport usage verify --file` does exactly that)

`start` (inclusive) and `end` (exclusive) filter on when a request started: `YYYY-MM-DD` (00:00 UTC),
an ISO 8601 timestamp, or Unix seconds. Token totals follow OpenAI's usage: `prompt_tokens` includes
`cached_prompt_tokens`; `input_tokens` = prompt - cached.
"""

import asyncio
from datetime import UTC, date, datetime, time
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query
from starlette.requests import Request
from starlette.responses import Response

from metering.event_codec import canonical_time
from metering.store_sql import StoredEvent
from metering.verify import CANONICAL_FIELDS, event_row
from serving.auth import Principal
from serving.errors import InvalidRequest

if TYPE_CHECKING:
    from serving.app import Platform

JSON = "application/json"
TENANT_GROUPS = ("model", "origin_country", "origin_source", "language", "outcome", "key_id", "serving_region",
                 "endpoint")
CHAIN = {
    "algorithm": "sha256",
    "hash": "hex(sha256(utf8(prev_hash) + canonical))",
    "canonical": "compact JSON array (no spaces) of these fields in this order: " + ", ".join(CANONICAL_FIELDS),
    "genesis_prev_hash": "0" * 64,
}


def parse_time(value: str | None, name: str) -> datetime | None:
    """YYYY-MM-DD (00:00 UTC), an ISO 8601 timestamp (UTC when it has no offset), or Unix seconds."""
    if value is None or value == "":
        return None
    v = value.strip()
    try:
        if v.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(v), UTC)
        if len(v) == 10:
            return datetime.combine(date.fromisoformat(v), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(v)
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidRequest(f"{name} must be YYYY-MM-DD, an ISO 8601 timestamp or Unix seconds, got {value[:40]!r}.",
                             param=name) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_window(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    s, e = parse_time(start, "start"), parse_time(end, "end")
    if s is not None and e is not None and e <= s:
        raise InvalidRequest("end must be after start.", param="end")
    return s, e


def parse_groups(group_by: str | None, allowed: tuple[str, ...], aliases: dict[str, str] | None = None,
                 default: tuple[str, ...] = ()) -> list[str]:
    if group_by is None:
        return list(default)
    out: list[str] = []
    for raw in group_by.split(","):
        g = raw.strip()
        if not g:
            continue
        g = (aliases or {}).get(g, g)
        if g not in allowed:
            raise InvalidRequest(f"group_by accepts {', '.join(allowed)}; got {raw.strip()!r}.", param="group_by")
        if g not in out:
            out.append(g)
    return out


def usage_row(r: dict[str, Any]) -> dict[str, Any]:
    prompt, cached, completion = int(r["prompt_tokens"]), int(r["cached_prompt_tokens"]), int(r["completion_tokens"])
    return {**{str(k): v for k, v in r.items()}, "input_tokens": prompt - cached, "total_tokens": prompt + completion}


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens")
    t = {k: sum(int(r[k]) for r in rows) for k in keys}
    t["input_tokens"] = t["prompt_tokens"] - t["cached_prompt_tokens"]
    t["total_tokens"] = t["prompt_tokens"] + t["completion_tokens"]
    return t


def iso(value: datetime | None) -> str | None:
    return None if value is None else canonical_time(value.astimezone(UTC))


def events_page(events: list[StoredEvent], limit: int, head: tuple[int, str] | None = None, *,
                tenant_view: bool = False) -> dict[str, Any]:
    """A page of events; the tenant's view is positioned (and paged) by `tenant_seq`, not the global `seq`."""
    more = len(events) > limit
    page = events[:limit]
    last = (page[-1].tenant_seq if tenant_view else page[-1].seq) if more and page else None
    out: dict[str, Any] = {"object": "list", "data": [event_row(s, tenant_view=tenant_view) for s in page],
                           "has_more": more, "next_after": last, "chain": CHAIN}
    if head is not None:
        out["chain_head"] = {"seq": head[0], "hash": head[1]}
    return out


def json_response(obj: Any) -> Response:
    return Response(orjson.dumps(obj), media_type=JSON)


def build(platform: "Platform") -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["usage"])
    usage = platform.usage

    async def principal(request: Request) -> Principal:
        return await platform.keyring.authenticate(request.headers.get("authorization"))

    PrincipalDep = Annotated[Principal, Depends(principal)]

    @r.get("/usage")
    async def tenant_usage(who: PrincipalDep, start: str | None = Query(default=None, max_length=40),
                           end: str | None = Query(default=None, max_length=40),
                           group_by: str | None = Query(default=None, max_length=200)) -> Response:
        s, e = parse_window(start, end)
        groups = parse_groups(group_by, TENANT_GROUPS)
        rows = await asyncio.to_thread(usage.summary, groups, tenant_id=who.tenant.id, start=s, end=e)
        data = [usage_row(row) for row in rows]
        return json_response({"object": "usage", "tenant_id": who.tenant.id, "start": iso(s), "end": iso(e),
                              "group_by": groups, "data": data, "totals": totals(data)})

    @r.get("/usage/events")
    async def tenant_events(who: PrincipalDep, start: str | None = Query(default=None, max_length=40),
                            end: str | None = Query(default=None, max_length=40),
                            after: int = Query(default=0, ge=0, le=2**62),
                            limit: int = Query(default=100, ge=1, le=1000)) -> Response:
        s, e = parse_window(start, end)

        def load() -> list[StoredEvent]:
            return list(usage.iter_events(tenant_id=who.tenant.id, start=s, end=e, after_tenant_seq=after,
                                          limit=limit + 1))

        events = await asyncio.to_thread(load)
        return json_response({**events_page(events, limit, tenant_view=True), "tenant_id": who.tenant.id})

    return r
