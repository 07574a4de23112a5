"""serving's tables: limit policies, the audit log, the content log, idempotency keys (SQLAlchemy Core).

Migrations live in serving/migrations (one linear Alembic history for every package's tables);
serving/db_schema.py combines these with metering's and billing's. Timestamps are naive UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

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

# Responses API objects kept for GET/DELETE /v1/responses/{id} (migration 0004_stored_responses): only
# for a tenant with content logging on and a request with `store` (OpenAI's default), until its retention.
stored_responses = Table(
    "stored_responses",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("response_id", String(128), primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False, index=True),
    Column("body", Text, nullable=False),
)

# --- idempotency keys (migration 0002_metering) ----------------------------------------------------------
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
