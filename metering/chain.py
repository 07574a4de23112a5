"""The usage ledger's hash chain: what each event's hash covers, and how it links to the one before.

Every stored event carries sha256(prev_hash + canonical content); the first links to GENESIS.
Shared by the two append paths (metering/store_sql.py, metering/sqlite_append.py) and the verifier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from metering.events import UsageEvent

GENESIS = "0" * 64
IN_CHUNK = 500  # request ids per "already stored?" query (SQLite and PostgreSQL cap bound parameters)


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(event: UsageEvent) -> bytes:
    """The bytes the hash covers: every field of the fact, in a fixed order and format."""
    return orjson.dumps([
        event.request_id, event.tenant_id, event.key_id, event.model, event.endpoint, event.origin_country,
        event.origin_source, event.language, event.serving_region, event.worker_id, event.prompt_tokens,
        event.cached_prompt_tokens, event.completion_tokens, event.stream, event.outcome.value,
        event.estimated, _ts(event.started_at), _ts(event.finished_at),
    ])


def chain_hash(prev_hash: str, event: UsageEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(event)).hexdigest()


def unique_events(events: Sequence[UsageEvent]) -> dict[str, UsageEvent]:
    unique: dict[str, UsageEvent] = {}
    for e in events:
        unique.setdefault(e.request_id, e)
    return unique


# The append statements, built once (SQLAlchemy caches their compiled form).
