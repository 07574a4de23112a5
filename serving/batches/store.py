"""SQL for the Batch API: files, batches and their lines (the only module here that speaks SQL).

Synchronous SQLAlchemy Core; the service and the runner call it through `asyncio.to_thread`. Every
state change that two gateway processes could race for is one conditional UPDATE (a claim): a line
goes pending -> running in exactly one process, a batch leaves a state exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, insert, select, update
from sqlalchemy.engine import Engine, RowMapping

from serving.batches.tables import batch_files, batch_lines, batches


@dataclass(frozen=True, slots=True)
class FileRow:
    id: str
    tenant_id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    storage_key: str


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: str
    tenant_id: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: str | None
    errors: str | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None


@dataclass(frozen=True, slots=True)
class NewLine:
    line_no: int
    custom_id: str | None
    request_id: str
    body: str | None  # a runnable line's request body (JSON); None: `result` is its error line
    result: str | None = None


@dataclass(frozen=True, slots=True)
class LineRow:
    batch_id: str
    line_no: int
    custom_id: str | None
    request_id: str
    body: str | None


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    completed: int
    failed: int


def _file(row: RowMapping) -> FileRow:
    return FileRow(**{k: row[k] for k in FileRow.__slots__})


def _batch(row: RowMapping) -> BatchRow:
    return BatchRow(**{k: row[k] for k in BatchRow.__slots__})


def _line(row: RowMapping) -> LineRow:
    return LineRow(**{k: row[k] for k in LineRow.__slots__})


class BatchStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- files ---------------------------------------------------------------------------------
    def insert_file(self, row: FileRow) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(batch_files).values(**_values(row)))

    def get_file(self, tenant_id: str, file_id: str) -> FileRow | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(batch_files).where(
                        batch_files.c.id == file_id, batch_files.c.tenant_id == tenant_id
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else _file(row)

    # --- batches -------------------------------------------------------------------------------
    def insert_batch(self, row: BatchRow) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(batches).values(**_values(row)))

    def get_batch(self, batch_id: str, tenant_id: str | None = None) -> BatchRow | None:
        q = select(batches).where(batches.c.id == batch_id)
        if tenant_id is not None:
            q = q.where(batches.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        return None if row is None else _batch(row)

    def list_batches(self, tenant_id: str, *, after: str | None, limit: int) -> list[BatchRow]:
        """The tenant's batches, newest first (ids sort by creation: shapes.sortable_id), after the
        batch `after` (the cursor), at most `limit`."""
        q = select(batches).where(batches.c.tenant_id == tenant_id)
        if after is not None:
            q = q.where(batches.c.id < after)
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(batches.c.id.desc()).limit(limit)).mappings().all()
        return [_batch(r) for r in rows]

    def in_status(self, *statuses: str) -> list[BatchRow]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(batches).where(batches.c.status.in_(statuses)).order_by(batches.c.created_at)
                )
                .mappings()
                .all()
            )
        return [_batch(r) for r in rows]

    def counts(self, batch_ids: Iterable[str]) -> dict[str, Counts]:
        """Request counts from the lines (live while a batch runs)."""
        ids = list(batch_ids)
        if not ids:
            return {}
        done = batch_lines.c.state == "done"
        q = (
            select(
                batch_lines.c.batch_id,
                func.count(),
                func.sum(case((and_(done, batch_lines.c.ok.is_(True)), 1), else_=0)),
                func.sum(case((and_(done, batch_lines.c.ok.is_(False)), 1), else_=0)),
            )
            .where(batch_lines.c.batch_id.in_(ids))
            .group_by(batch_lines.c.batch_id)
        )
        with self.engine.connect() as conn:
            return {r[0]: Counts(int(r[1]), int(r[2] or 0), int(r[3] or 0)) for r in conn.execute(q)}

    def transition(self, batch_id: str, from_status: Sequence[str], to_status: str, **values: Any) -> bool:
        """Move a batch from one of `from_status` to `to_status` (with `values`); False if it was not
        there."""
        with self.engine.begin() as conn:
            res = conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status.in_(from_status))
                .values(status=to_status, **values)
            )
        return res.rowcount == 1

    def set_values(self, batch_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id).values(**values))

    def start(self, batch_id: str, lines: Sequence[NewLine], now: int) -> bool:
        """validating -> in_progress with its lines, in one transaction (False: someone else did it)."""
        with self.engine.begin() as conn:
            res = conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status == "validating")
                .values(status="in_progress", in_progress_at=now, total=len(lines))
            )
            if res.rowcount != 1:
                return False
            if lines:
                conn.execute(
                    insert(batch_lines),
                    [
                        {
                            "batch_id": batch_id,
                            "line_no": ln.line_no,
                            "custom_id": ln.custom_id,
                            "request_id": ln.request_id,
                            "body": ln.body,
                            "not_before": 0,
                            "state": "pending" if ln.result is None else "done",
                            "ok": None if ln.result is None else False,
                            "result": ln.result,
                        }
                        for ln in lines
                    ],
                )
        return True

    def finalize(
        self,
        batch_id: str,
        from_status: Sequence[str],
        to_status: str,
        files: Sequence[FileRow],
        **values: Any,
    ) -> bool:
        """The batch's end: its output/error file rows and its final state, in one transaction."""
        with self.engine.begin() as conn:
            res = conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status.in_(from_status))
                .values(status=to_status, **values)
            )
            if res.rowcount != 1:
                return False
            existing = set(
                conn.execute(
                    select(batch_files.c.id).where(batch_files.c.id.in_([f.id for f in files]))
                ).scalars()
            )
            for f in files:
                if f.id not in existing:
                    conn.execute(insert(batch_files).values(**_values(f)))
        return True

    # --- lines ---------------------------------------------------------------------------------
    def claim(self, now: int, limit: int) -> list[LineRow]:
        """Up to `limit` pending lines of in-progress batches (oldest batch first), each claimed
        (pending -> running) by this call alone."""
        q = (
            select(batch_lines)
            .join(batches, batches.c.id == batch_lines.c.batch_id)
            .where(
                batches.c.status == "in_progress",
                batch_lines.c.state == "pending",
                batch_lines.c.not_before <= now,
            )
            .order_by(batches.c.created_at, batch_lines.c.batch_id, batch_lines.c.line_no)
            .limit(limit * 4)
        )
        got: list[LineRow] = []
        with self.engine.begin() as conn:
            for row in conn.execute(q).mappings().all():
                res = conn.execute(
                    update(batch_lines)
                    .where(
                        batch_lines.c.batch_id == row["batch_id"],
                        batch_lines.c.line_no == row["line_no"],
                        batch_lines.c.state == "pending",
                    )
                    .values(state="running", claimed_at=now)
                )
                if res.rowcount == 1:
                    got.append(_line(row))
                    if len(got) == limit:
                        break
        return got

    def put_back(self, line: LineRow, not_before: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(batch_lines)
                .where(
                    batch_lines.c.batch_id == line.batch_id,
                    batch_lines.c.line_no == line.line_no,
                    batch_lines.c.state == "running",
                )
                .values(state="pending", not_before=not_before, claimed_at=None)
            )

    def finish(self, line: LineRow, *, ok: bool, result: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(batch_lines)
                .where(
                    batch_lines.c.batch_id == line.batch_id,
                    batch_lines.c.line_no == line.line_no,
                    batch_lines.c.state == "running",
                )
                .values(state="done", ok=ok, result=result, body=None)
            )

    def pending(self, batch_id: str) -> list[LineRow]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(batch_lines).where(
                        batch_lines.c.batch_id == batch_id, batch_lines.c.state == "pending"
                    )
                )
                .mappings()
                .all()
            )
        return [_line(r) for r in rows]

    def close_pending(self, results: Mapping[tuple[str, int], str]) -> None:
        """Pending lines that will never run (batch cancelled or expired): done, with their error lines."""
        with self.engine.begin() as conn:
            for (batch_id, line_no), result in results.items():
                conn.execute(
                    update(batch_lines)
                    .where(
                        batch_lines.c.batch_id == batch_id,
                        batch_lines.c.line_no == line_no,
                        batch_lines.c.state == "pending",
                    )
                    .values(state="done", ok=False, result=result, body=None)
                )

    def open_lines(self, batch_id: str) -> int:
        """Lines of the batch not done yet (pending or running)."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(batch_lines)
                    .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state != "done")
                ).scalar()
                or 0
            )

    def stale(self, claimed_before: int) -> list[LineRow]:
        """Running lines whose claim is older than a request can take: their process is gone."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(batch_lines).where(
                        batch_lines.c.state == "running", batch_lines.c.claimed_at < claimed_before
                    )
                )
                .mappings()
                .all()
            )
        return [_line(r) for r in rows]

    def results(self, batch_id: str) -> list[tuple[bool, str]]:
        """(in the output file?, line) of every done line, in input order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(batch_lines.c.ok, batch_lines.c.result)
                .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "done")
                .order_by(batch_lines.c.line_no)
            ).all()
        return [(bool(r[0]), str(r[1])) for r in rows]


def _values(row: FileRow | BatchRow) -> dict[str, Any]:
    return {k: getattr(row, k) for k in type(row).__slots__}
