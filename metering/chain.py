"""The usage ledger's hash chain: what each event's hash covers, and how it links to the one before.

Every stored event carries sha256(prev_hash + canonical content); the first links to GENESIS.
Shared by the two append paths (metering/store_sql.py, metering/sqlite_append.py) and the verifier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

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


class TenantPositions:
    """The next `tenant_seq` of each tenant, for one writer inside its serialized append transaction.

    `begin(head)` with the chain head read in the transaction: the positions remembered from this
    writer's last commit stay valid only if nobody appended since (the head is the one it wrote);
    `missing` are the tenants to look up (their MAX(tenant_seq), 0 for none), `take` hands out the
    next position, `committed(head)` keeps them for the next transaction. A transaction that does
    not commit leaves them invalid.
    """

    MAX_TENANTS = 100_000  # forget everything beyond this many tenants (a bound, not a limit)

    def __init__(self) -> None:
        self._head: str | None = None
        self._last: dict[str, int] = {}

    def begin(self, head: str, tenants: Iterable[str]) -> list[str]:
        """Start a transaction whose chain head is `head`; returns the tenants to look up."""
        if head != self._head or len(self._last) > self.MAX_TENANTS:
            self._last.clear()
        self._head = None
        return sorted({t for t in tenants if t not in self._last})

    def found(self, tenants: Iterable[str], last: Mapping[str, int | None]) -> None:
        for t in tenants:
            self._last[t] = int(last.get(t) or 0)

    def take(self, tenant: str) -> int:
        n = self._last[tenant] + 1
        self._last[tenant] = n
        return n

    def committed(self, head: str) -> None:
        self._head = head
