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
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
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

# --- guardrails (migration 0002_guardrails): limits, budgets, audit log, content logging ---------------
# Limits and budgets of a tenant (scope "tenant") or of one key (scope "key"). NULL = no limit.
# Money amounts are exact decimal text in the tenant's currency (never floats).
limit_policies = Table(
    "limit_policies",
    metadata,
    Column("scope", String(8), primary_key=True),  # tenant | key
    Column("scope_id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("rpm", Integer),
    Column("tpm", BigInteger),
    Column("budget_unit", String(8)),  # tokens | money
    Column("budget_amount", String(40)),
    Column("budget_period", String(8)),  # month | prepaid
    Column("budget_start", DateTime),  # prepaid: usage from here on counts against the balance
    Column("max_tokens", Integer),
    Column("max_prompt_tokens", Integer),
    Column("request_timeout_s", Integer),
    Column("content_logging", Boolean),  # tenant scope only: store prompts and completions
    Column("content_retention_days", Integer),
    Column("updated_at", DateTime, nullable=False),
)

# Who did what, when, from where: every admin API and CLI change. Append-only.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer().with_variant(BigInteger, "postgresql"), primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False, index=True),
    Column("actor", String(200), nullable=False),
    Column("source", String(8), nullable=False),  # api | cli
    Column("client", String(200)),  # IP address (api) or host name (cli)
    Column("action", String(64), nullable=False),
    Column("target", String(128)),
    Column("tenant_id", String(64), index=True),
    Column("outcome", String(16), nullable=False),  # ok | error
    Column("detail", Text),  # JSON; never a secret
)

# Prompts and completions, only for tenants that turned content logging on; purged after retention.
content_log = Table(
    "content_log",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("key_id", String(32), nullable=False),
    Column("model", String(128), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),
    Column("request", Text, nullable=False),
    Column("completion", Text),
)

# --- metering (migration 0002_metering): idempotency keys, reconcile snapshots --------------------------
# Idempotency-Key of a tenant -> the request that key started, and what that request answered, so a
# retry gets the first answer instead of a second generation (and a second bill). Expires after a day.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # sha256 of endpoint + canonical request body
    Column("request_id", String(64), nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("state", String(16), nullable=False),  # in_flight | done
    Column("status", Integer),
    Column("outcome", String(24)),
    Column("response", LargeBinary),  # the JSON body, or the SSE bytes sent, replayed to retries
    Column("created_at", DateTime, nullable=False),
    Column("completed_at", DateTime),
    Column("expires_at", DateTime, nullable=False, index=True),
)

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
Index("ix_metering_snapshots_worker", metering_snapshots.c.worker_id, metering_snapshots.c.model,
      metering_snapshots.c.taken_at)
