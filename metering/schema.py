"""metering's tables: tenants, API keys, the registry version, the usage ledger, reconcile snapshots.

Migrations live in serving/migrations (Alembic, one linear history); these objects are what the
stores query. Timestamps are stored as naive UTC and handed out as aware UTC datetimes. serving's
tables are in serving/tables.py, billing's in billing.

The usage ledger's event columns are derived from the UsageEvent dataclass (metering/events.py):
its field order, types, nullability and text widths.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from metering.event_codec import EventCodec
from metering.events import UsageEvent

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("billing_country", String(2), nullable=False),
    Column("business", Boolean, nullable=False),
    Column("tax_id", String(64)),
    Column("currency", String(3), nullable=False),
    Column("language", String(8)),
    Column("allowed_models", Text),  # JSON list; NULL means every catalogued model
    Column("created_at", DateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False, index=True),
    Column("prefix", String(32), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("name", String(200)),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime),
    Column("revoked_at", DateTime),
)

# A single row whose version moves on every tenant or key change, so every gateway process can
# notice a revocation within its refresh interval without querying keys on the hot path.
registry_version = Table(
    "registry_version",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)


def event_columns(cls: type[UsageEvent] = UsageEvent) -> list[Column[Any]]:
    """One column per field of the event class, in field order (`request_id` unique)."""
    c = EventCodec(cls)
    out: list[Column[Any]] = []
    for f in c.fields:
        t = c.types[f.name]
        kind: Any
        if t is bool:
            kind = Boolean
        elif t is int:
            kind = Integer
        elif issubclass(t, datetime):
            kind = DateTime
        elif issubclass(t, (str, enum.Enum)):
            kind = String(f.metadata["max_length"])
        else:
            raise TypeError(f"UsageEvent.{f.name}: no column type for {t!r}")
        out.append(Column(f.name, kind, nullable=c.nullable[f.name], unique=f.name == "request_id" or None))
    return out


usage_events = Table(
    "usage_events",
    metadata,
    Column("seq", Integer().with_variant(BigInteger, "postgresql"), primary_key=True, autoincrement=True),
    *event_columns(),
    Column("recorded_at", DateTime, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # The event's position among its tenant's events (1, 2, ...), assigned in the same serialized
    # append transaction as `seq`: what the tenant API shows instead of the global `seq`.
    Column("tenant_seq", BigInteger, nullable=False),
)
Index("ix_usage_tenant_started", usage_events.c.tenant_id, usage_events.c.started_at)
Index("ux_usage_tenant_seq", usage_events.c.tenant_id, usage_events.c.tenant_seq, unique=True)
Index("ix_usage_started", usage_events.c.started_at)

# A worker's own token counters at one moment, with the ledger position at that moment: the baseline
# `tokenport reconcile --since T` compares deltas against. `counters_epoch` (unix seconds, the
# worker's counter creation time) identifies one worker process: counters restart at zero with it.
metering_snapshots = Table(
    "metering_snapshots",
    metadata,
    Column("id", Integer().with_variant(BigInteger, "postgresql"), primary_key=True, autoincrement=True),
    Column("taken_at", DateTime, nullable=False),
    Column("worker_id", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("counters_epoch", Float, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("cached_prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("ledger_seq", BigInteger, nullable=False),
)
Index(
    "ix_metering_snapshots_worker",
    metering_snapshots.c.worker_id,
    metering_snapshots.c.model,
    metering_snapshots.c.taken_at,
)
