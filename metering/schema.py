"""Table definitions for tenants, API keys and the usage ledger (SQLAlchemy Core).

Migrations live in serving/migrations (Alembic); these objects are what the stores query.
Timestamps are stored as naive UTC and handed out as aware UTC datetimes.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

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

usage_events = Table(
    "usage_events",
    metadata,
    Column("seq", Integer().with_variant(BigInteger, "postgresql"), primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("tenant_id", String(64), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("model", String(128), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("origin_country", String(2), nullable=False),
    Column("origin_source", String(16), nullable=False),
    Column("language", String(8)),
    Column("serving_region", String(64)),
    Column("worker_id", String(64)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("outcome", String(24), nullable=False),
    Column("estimated", Boolean, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=False),
    Column("recorded_at", DateTime, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
Index("ix_usage_tenant_started", usage_events.c.tenant_id, usage_events.c.started_at)
Index("ix_usage_started", usage_events.c.started_at)
