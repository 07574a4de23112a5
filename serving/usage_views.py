"""Usage totals and ledger events as the tenant and admin usage APIs answer them (one shape each).

Token totals follow OpenAI's usage: `prompt_tokens` includes `cached_prompt_tokens`;
`input_tokens` = prompt - cached. An events page carries every field the hash covers, in canonical
form, so a tenant can recompute each hash (`tokenport usage verify --file`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from metering.event_codec import canonical_time
from metering.store_sql import StoredEvent
from metering.verify import CANONICAL_FIELDS, event_row
from serving.errors import InvalidRequest

TENANT_GROUPS = (
    "model",
    "origin_country",
    "origin_source",
    "language",
    "outcome",
    "key_id",
    "serving_region",
    "endpoint",
)
ADMIN_GROUPS = ("tenant_id", *TENANT_GROUPS, "worker_id")
ADMIN_ALIASES = {"tenant": "tenant_id", "worker": "worker_id"}
CHAIN = {
    "algorithm": "sha256",
    "hash": "hex(sha256(utf8(prev_hash) + canonical))",
    "canonical": "compact JSON array (no spaces) of these fields in this order: "
    + ", ".join(CANONICAL_FIELDS)
    + "; trailing fields that are null are left out",
    "genesis_prev_hash": "0" * 64,
}


def parse_groups(
    group_by: str | None,
    allowed: tuple[str, ...],
    aliases: dict[str, str] | None = None,
    default: tuple[str, ...] = (),
) -> list[str]:
    if group_by is None:
        return list(default)
    out: list[str] = []
    for raw in group_by.split(","):
        g = raw.strip()
        if not g:
            continue
        g = (aliases or {}).get(g, g)
        if g not in allowed:
            raise InvalidRequest(
                f"group_by accepts {', '.join(allowed)}; got {raw.strip()!r}.", param="group_by"
            )
        if g not in out:
            out.append(g)
    return out


def usage_row(r: dict[str, Any]) -> dict[str, Any]:
    prompt, cached, completion = (
        int(r["prompt_tokens"]),
        int(r["cached_prompt_tokens"]),
        int(r["completion_tokens"]),
    )
    return {
        **{str(k): v for k, v in r.items()},
        "input_tokens": prompt - cached,
        "total_tokens": prompt + completion,
    }


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens")
    t = {k: sum(int(r[k]) for r in rows) for k in keys}
    t["input_tokens"] = t["prompt_tokens"] - t["cached_prompt_tokens"]
    t["total_tokens"] = t["prompt_tokens"] + t["completion_tokens"]
    return t


def iso(value: datetime | None) -> str | None:
    return None if value is None else canonical_time(value.astimezone(UTC))


def events_page(
    events: list[StoredEvent], limit: int, head: tuple[int, str] | None = None, *, tenant_view: bool = False
) -> dict[str, Any]:
    """A page of events; the tenant's view is positioned (and paged) by `tenant_seq`, not the global `seq`
    (which would count other tenants' requests)."""
    more = len(events) > limit
    page = events[:limit]
    last = (page[-1].tenant_seq if tenant_view else page[-1].seq) if more and page else None
    out: dict[str, Any] = {
        "object": "list",
        "data": [event_row(s, tenant_view=tenant_view) for s in page],
        "has_more": more,
        "next_after": last,
        "chain": CHAIN,
    }
    if head is not None:
        out["chain_head"] = {"seq": head[0], "hash": head[1]}
    return out
