"""The usage ledger's hash chain: what each event's hash covers, and how it links to the one before.

Every stored event carries sha256(prev_hash + canonical content); the first links to GENESIS.
Shared by the two append paths (metering/store_sql.py, metering/sqlite_append.py) and the verifier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import orjson

from metering.event_codec import codec
from metering.events import UsageEvent

GENESIS = "0" * 64
IN_CHUNK = 500  # request ids per "already stored?" query (SQLite and PostgreSQL cap bound parameters)


def canonical(event: UsageEvent) -> bytes:
    """The bytes the hash covers: every field of the fact, in the dataclass's order and canonical form
    (metering/event_codec.py)."""
    return orjson.dumps(codec().canonical(event))


def chain_hash(prev_hash: str, event: UsageEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(event)).hexdigest()


def unique_events(events: Sequence[UsageEvent]) -> dict[str, UsageEvent]:
    unique: dict[str, UsageEvent] = {}
    for e in events:
        unique.setdefault(e.request_id, e)
    return unique

