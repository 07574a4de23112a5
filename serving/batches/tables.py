"""The Batch API's tables (SQLAlchemy Core): uploaded files, batches and the lines of each batch.

Registered with serving/db_schema.py; created by migration 0003_batches. Times are Unix seconds
(the API's own unit: every OpenAI object carries them so). A file's bytes live in the file store
(serving/batches/files.py), the rows only name them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

# An uploaded (purpose `batch`) or produced (purpose `batch_output`) file of one tenant.
batch_files = Table(
    "batch_files",
    metadata,
    Column("id", String(64), primary_key=True),  # file-<24 hex>
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("purpose", String(32), nullable=False),  # batch | batch_output
    Column("filename", String(255), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("storage_key", String(255), nullable=False),  # the file store's name for its bytes
)

# One batch: OpenAI's Batch object, plus who created it (the key its lines are admitted and metered under).
batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),  # batch_<24 hex>
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("key_id", String(32), nullable=False),
    Column("endpoint", String(64), nullable=False),  # /v1/chat/completions | /v1/completions | ...
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(8), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("metadata", Text),  # JSON object or NULL
    Column("errors", Text),  # JSON list of {code, message, param, line} (a batch that failed validation)
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
)

# The lines of a batch, written when it is validated. A line is claimed (pending -> running) by one
# gateway process at a time; its request id is fixed here, so its usage event can be written once only.
batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("line_no", Integer, primary_key=True),  # 1-based line of the input file
    Column("custom_id", String(512)),
    Column("request_id", String(64), nullable=False, unique=True),  # req_<32 hex>: the ledger's id
    Column("state", String(8), nullable=False),  # pending | running | done
    Column("body", Text),  # the request body (JSON) of a runnable line
    Column("not_before", BigInteger, nullable=False, default=0),  # a line put back waits until then
    Column("claimed_at", BigInteger),  # when its running claim was taken (a lease: stale after a crash)
    Column("ok", Boolean),  # done: True in the output file, False in the error file
    Column("result", Text),  # done: the output or error line (JSON)
    Index("ix_batch_lines_state", "batch_id", "state"),
)
