"""The only module with usage-ledger SQL (SQLAlchemy Core; SQLite and PostgreSQL).

Appends are idempotent on request_id and hash-chained: each stored event carries
sha256(prev_hash + canonical content). The chain is extended inside one serialized transaction
(BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL), so several gateway processes can share
one ledger.

Appends are the hot path (one transaction per group commit, on every request at low load). On an
SQLite file they go through one long-lived DBAPI connection with constant SQL strings
(`SqliteAppender`): the same transaction and the same rows as the SQLAlchemy statements, for about
a ninth of the CPU (synchronous=NORMAL; a fifth at FULL, where the fsync is most of what is left).
PostgreSQL (and in-memory SQLite) use SQLAlchemy Core statements built once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, func, insert, select, text
from sqlalchemy.engine import Engine

from metering.chain import GENESIS, IN_CHUNK, TenantPositions, chain_hash, unique_events
from metering.clock import to_aware, to_naive, utcnow
from metering.db import is_sqlite_file
from metering.event_codec import codec
from metering.events import Outcome, UsageEvent
from metering.schema import metering_snapshots, usage_events
from metering.sqlite_append import SQLITE_FULL, SqliteAppender

_PG_CHAIN_LOCK = 7_302_118  # advisory lock id serializing chain appends on PostgreSQL

# `tokenport usage export`: every field of the event (rows from `codec().to_record`), in field order.
EXPORT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UsageEvent))
GROUP_FIELDS = frozenset(
    {
        "tenant_id",
        "origin_country",
        "model",
        "language",
        "outcome",
        "key_id",
        "serving_region",
        "endpoint",
        "worker_id",
        "origin_source",
    }
)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int  # the position in the whole ledger (the hash chain's order)
    event: UsageEvent
    recorded_at: datetime
    prev_hash: str
    hash: str
    tenant_seq: int  # the position among the tenant's own events (what the tenant API shows)


_PG_LOCK_CHAIN = text("SELECT pg_advisory_xact_lock(:k)")
_SELECT_EXISTING = select(usage_events.c.request_id).where(
    usage_events.c.request_id.in_(bindparam("ids", expanding=True))
)
_SELECT_HEAD = select(usage_events.c.hash).order_by(usage_events.c.seq.desc()).limit(1)
_INSERT_EVENTS = insert(usage_events)
_SELECT_TENANT_HEADS = (
    select(usage_events.c.tenant_id, func.max(usage_events.c.tenant_seq))
    .where(usage_events.c.tenant_id.in_(bindparam("tenants", expanding=True)))
    .group_by(usage_events.c.tenant_id)
)
# PostgreSQL: one backward probe of ux_usage_tenant_seq per tenant (a max() without GROUP BY), O(log n).
# The GROUP BY form above reads every index entry of each tenant, O(its events), inside the chain lock:
# 20 ms per commit at 50,000 events of one tenant (bench/results/*-ledger-writers.md).
_PG_SELECT_TENANT_HEADS = text(
    "SELECT t.tenant_id, (SELECT max(u.tenant_seq) FROM usage_events u WHERE u.tenant_id = t.tenant_id) "
    "FROM unnest(CAST(:tenants AS varchar[])) AS t(tenant_id)"
)


class UsageStore:
    def __init__(self, engine: Engine, *, append_wait_s: float | None = None) -> None:
        """`append_wait_s`: the longest an append waits for the chain's write lock (SQLite's busy
        timeout, PostgreSQL's lock_timeout) before it fails, so that the ledger spools instead of
        stalling its requests (`metering.spool_after_s`); None: the database's own waits (30 s on SQLite)."""
        self._engine = engine
        self._append_wait_s = append_wait_s
        self._sqlite = SqliteAppender(engine, wait_s=append_wait_s) if is_sqlite_file(engine) else None

    def close(self) -> None:
        """Close the store's own SQLite writer connection (also done by `engine.dispose()`; a later
        append opens a new one)."""
        if self._sqlite is not None:
            self._sqlite.close()

    def checkpoint_in_background(self) -> bool:
        """Take SQLite's WAL checkpoints off the append path: the writer connection stops checkpointing
        inside its COMMITs and the caller runs `checkpoint()` from another thread. Done only at
        synchronous=NORMAL (or OFF), where a checkpoint inside a COMMIT first fsyncs the WAL written
        since the last one: a 5-10 ms stall for that commit's requests (p99 at one connection 6.4 ->
        2.2 ms). At FULL each COMMIT has fsync'd its WAL already, and a checkpointer fsyncing the
        database file at the same time slows every COMMIT's fsync instead (p50 +0.17 ms, measured):
        False, nothing changed. False too unless the ledger is an SQLite file."""
        if self._sqlite is None or self._sqlite.synchronous() >= SQLITE_FULL:
            return False
        self._sqlite.autocheckpoint = False
        self._sqlite.close()  # the next append reconnects with wal_autocheckpoint=0
        return True

    def checkpoint(self) -> None:
        if self._sqlite is not None:
            self._sqlite.checkpoint()

    def append_batch(self, events: Sequence[UsageEvent]) -> list[str]:
        """Store the events not stored yet, in one transaction; returns the request ids stored now.
        Thread-safe. Raises SQLAlchemyError (DBAPIError) when the database fails."""
        if self._sqlite is None:
            return self._append_sqlalchemy(events)
        if not events:
            return []
        return self._sqlite.append(unique_events(events))

    def _append_sqlalchemy(self, events: Sequence[UsageEvent]) -> list[str]:
        """append_batch through SQLAlchemy Core (PostgreSQL, in-memory SQLite)."""
        if not events:
            return []
        unique = unique_events(events)
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                if self._append_wait_s is not None:
                    conn.execute(
                        text(f"SET LOCAL lock_timeout = {max(1, round(self._append_wait_s * 1000))}")
                    )
                conn.execute(_PG_LOCK_CHAIN, {"k": _PG_CHAIN_LOCK})
            ids = list(unique)
            existing: set[str] = set()
            for i in range(0, len(ids), IN_CHUNK):
                existing.update(conn.execute(_SELECT_EXISTING, {"ids": ids[i : i + IN_CHUNK]}).scalars())
            fresh = [e for rid, e in unique.items() if rid not in existing]
            if not fresh:
                return []
            prev = conn.execute(_SELECT_HEAD).scalar() or GENESIS
            positions = TenantPositions()
            tenants = positions.begin(prev, (e.tenant_id for e in fresh))
            heads = _PG_SELECT_TENANT_HEADS if conn.dialect.name == "postgresql" else _SELECT_TENANT_HEADS
            for i in range(0, len(tenants), IN_CHUNK):
                last = conn.execute(heads, {"tenants": tenants[i : i + IN_CHUNK]}).all()
                positions.found(tenants[i : i + IN_CHUNK], {str(t): int(n or 0) for t, n in last})
            now = to_naive(utcnow())
            rows = []
            for e in fresh:
                h = chain_hash(prev, e)
                rows.append(_row(e, now, prev, h, positions.take(e.tenant_id)))
                prev = h
            conn.execute(_INSERT_EVENTS, rows)
        return [e.request_id for e in fresh]

    def get(self, request_id: str) -> StoredEvent | None:
        with self._engine.connect() as conn:
            row = (
                conn.execute(select(usage_events).where(usage_events.c.request_id == request_id))
                .mappings()
                .first()
            )
        return None if row is None else _stored(row)

    def iter_events(
        self,
        *,
        tenant_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        after_seq: int = 0,
        after_tenant_seq: int = 0,
        limit: int | None = None,
        batch: int = 5000,
    ) -> Iterator[StoredEvent]:
        """Events in ledger order (seq), filtered by tenant and started_at in [start, end), after a
        ledger position or (with a tenant) after a position among the tenant's events."""
        conds = [usage_events.c.seq > after_seq]
        if tenant_id is not None:
            conds.append(usage_events.c.tenant_id == tenant_id)
            if after_tenant_seq:
                conds.append(usage_events.c.tenant_seq > after_tenant_seq)
        if start is not None:
            conds.append(usage_events.c.started_at >= to_naive(start))
        if end is not None:
            conds.append(usage_events.c.started_at < to_naive(end))
        remaining = limit
        last = after_seq
        while remaining is None or remaining > 0:
            conds[0] = usage_events.c.seq > last
            n = batch if remaining is None else min(batch, remaining)
            with self._engine.connect() as conn:
                rows = (
                    conn.execute(
                        select(usage_events).where(and_(*conds)).order_by(usage_events.c.seq).limit(n)
                    )
                    .mappings()
                    .all()
                )
            if not rows:
                return
            for r in rows:
                yield _stored(r)
            last = rows[-1]["seq"]
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < n:
                return

    def summary(
        self,
        group_by: Sequence[str],
        *,
        tenant_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, object]]:
        """Token totals and request counts grouped by the given fields (paged in group order)."""
        bad = [g for g in group_by if g not in GROUP_FIELDS]
        if bad:
            raise ValueError(
                f"cannot group by {', '.join(bad)}; choose from {', '.join(sorted(GROUP_FIELDS))}"
            )
        cols = [usage_events.c[g] for g in group_by]
        q = select(
            *cols,
            func.count().label("requests"),
            func.coalesce(func.sum(usage_events.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage_events.c.cached_prompt_tokens), 0).label("cached_prompt_tokens"),
            func.coalesce(func.sum(usage_events.c.completion_tokens), 0).label("completion_tokens"),
        )
        if tenant_id is not None:
            q = q.where(usage_events.c.tenant_id == tenant_id)
        if start is not None:
            q = q.where(usage_events.c.started_at >= to_naive(start))
        if end is not None:
            q = q.where(usage_events.c.started_at < to_naive(end))
        if cols:
            q = q.group_by(*cols).order_by(*cols)
        if limit is not None:
            q = q.limit(limit).offset(offset)
        with self._engine.connect() as conn:
            return [
                {
                    k: (
                        int(v)
                        if k in {"requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens"}
                        else v
                    )
                    for k, v in r.items()
                }
                for r in conn.execute(q).mappings().all()
            ]

    def language_totals(
        self, *, start: datetime, end: datetime, tenant_id: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        """Per (language, model) in [start, end): requests and tokens of every event, and the tokens and
        text sizes of the `ok` events that carry sizes (the token-tax report, metering/language_report.py)."""
        e = usage_events.c
        sized = and_(e.outcome == Outcome.OK.value, e.prompt_chars.is_not(None))

        def total(col: Any, where: Any = None) -> Any:
            value = col if where is None else case((where, col), else_=0)
            return func.coalesce(func.sum(value), 0)

        q = select(
            e.language,
            e.model,
            func.count().label("requests"),
            total(e.prompt_tokens).label("prompt_tokens"),
            total(e.completion_tokens).label("completion_tokens"),
            total(case((sized, 1), else_=0)).label("sized_requests"),
            total(e.prompt_tokens, sized).label("sized_prompt_tokens"),
            total(e.completion_tokens, sized).label("sized_completion_tokens"),
            *(
                total(e[c], sized).label(c)
                for c in ("prompt_chars", "prompt_bytes", "completion_chars", "completion_bytes")
            ),
        ).where(e.started_at >= to_naive(start), e.started_at < to_naive(end))
        if tenant_id is not None:
            q = q.where(e.tenant_id == tenant_id)
        if model is not None:
            q = q.where(e.model == model)
        q = q.group_by(e.language, e.model).order_by(e.model, e.language)
        with self._engine.connect() as conn:
            return [
                {k: (v if k in ("language", "model") else int(v)) for k, v in r.items()}
                for r in conn.execute(q).mappings().all()
            ]

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(usage_events)).scalar() or 0)

    # --- health, reconciliation ------------------------------------------------------------------
    def ping(self) -> None:
        """Raises SQLAlchemyError when the database cannot be reached."""
        with self._engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def get_seq(self, seq: int) -> StoredEvent | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(usage_events).where(usage_events.c.seq == seq)).mappings().first()
        return None if row is None else _stored(row)

    def max_seq(self) -> int:
        """The ledger position: every event committed so far has seq <= this."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.max(usage_events.c.seq))).scalar() or 0)

    def worker_totals(
        self, worker_id: str, model: str, *, after_seq: int, upto_seq: int, started_from: datetime | None
    ) -> WorkerTotals:
        """Token totals of one worker and model for events with seq in (after_seq, upto_seq] that
        started at or after `started_from` (the worker's counter epoch)."""
        c = usage_events.c
        cut_off = func.sum(case((c.outcome.in_(CUT_OFF_OUTCOMES), 1), else_=0))
        q = select(
            func.count(),
            func.coalesce(func.sum(c.prompt_tokens), 0),
            func.coalesce(func.sum(c.cached_prompt_tokens), 0),
            func.coalesce(func.sum(c.completion_tokens), 0),
            func.coalesce(cut_off, 0),
            func.coalesce(func.sum(case((c.estimated.is_(True), 1), else_=0)), 0),
        ).where(c.worker_id == worker_id, c.model == model, c.seq > after_seq, c.seq <= upto_seq)
        if started_from is not None:
            q = q.where(c.started_at >= to_naive(started_from))
        with self._engine.connect() as conn:
            row = conn.execute(q).one()
        return WorkerTotals(*(int(v or 0) for v in row))

    def save_snapshots(self, rows: Sequence[dict[str, object]]) -> None:
        if rows:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(metering_snapshots),
                    [
                        {**r, "taken_at": to_naive(r["taken_at"])}  # type: ignore[arg-type]
                        for r in rows
                    ],
                )

    def snapshot_before(self, worker_id: str, model: str, at: datetime, epoch: float) -> Snapshot | None:
        """The latest snapshot of this worker process (same counter epoch) taken at or before `at`."""
        s = metering_snapshots.c
        q = (
            select(metering_snapshots)
            .where(
                s.worker_id == worker_id,
                s.model == model,
                s.taken_at <= to_naive(at),
                s.counters_epoch >= epoch - 0.001,
                s.counters_epoch <= epoch + 0.001,
            )
            .order_by(s.taken_at.desc(), s.id.desc())
            .limit(1)
        )
        with self._engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        if row is None:
            return None
        taken = to_aware(row["taken_at"])
        assert taken is not None
        return Snapshot(
            taken_at=taken,
            worker_id=row["worker_id"],
            model=row["model"],
            counters_epoch=float(row["counters_epoch"]),
            prompt_tokens=int(row["prompt_tokens"]),
            cached_prompt_tokens=int(row["cached_prompt_tokens"]),
            completion_tokens=int(row["completion_tokens"]),
            ledger_seq=int(row["ledger_seq"]),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A worker's counters at one moment and the ledger position then (table metering_snapshots)."""

    taken_at: datetime
    worker_id: str
    model: str
    counters_epoch: float
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    ledger_seq: int


CUT_OFF_OUTCOMES = (Outcome.CLIENT_CANCELLED.value, Outcome.UPSTREAM_ERROR.value)


@dataclass(frozen=True, slots=True)
class WorkerTotals:
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cut_off: int  # client_cancelled + upstream_error events
    estimated: int


def _row(e: UsageEvent, recorded_at: datetime, prev_hash: str, h: str, tenant_seq: int) -> dict[str, object]:
    return {
        **codec().to_db(e),
        "recorded_at": recorded_at,
        "prev_hash": prev_hash,
        "hash": h,
        "tenant_seq": tenant_seq,
    }


def _stored(r: Mapping[Any, Any]) -> StoredEvent:
    recorded = to_aware(r["recorded_at"])
    assert recorded is not None
    return StoredEvent(
        seq=r["seq"],
        event=codec().from_db(r),
        recorded_at=recorded,
        prev_hash=r["prev_hash"],
        hash=r["hash"],
        tenant_seq=r["tenant_seq"],
    )
