"""The batch runner and store without a gateway: exclusive claims, recovery of lines claimed by a
process that died, and a finalize cut by a restart done again with the same files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from metering.db import make_engine
from serving import db_schema
from serving.batches import shapes
from serving.batches.execute import LineExecutor
from serving.batches.files import DiskFileStore
from serving.batches.runner import BatchRunner
from serving.batches.store import BatchRow, BatchStore
from serving.settings import BatchSettings


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BatchStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db_schema.upgrade(engine)
    yield BatchStore(engine)
    engine.dispose()


def batch(store: BatchStore, n: int, *, status: str = "validating") -> BatchRow:
    row = BatchRow(
        id=shapes.sortable_id("batch_"),
        tenant_id="t-1",
        key_id="k-1",
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status=status,
        metadata=None,
        errors=None,
        output_file_id=None,
        error_file_id=None,
        total=0,
        completed=0,
        failed=0,
        created_at=100,
        expires_at=100 + 86400,
    )
    store.insert_batch(row)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    text = "\n".join(
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": row.endpoint, "body": body}).decode()
        for i in range(n)
    )
    assert store.start(row.id, shapes.parse_input(text, row.endpoint), 100)
    assert not store.start(row.id, [], 100)  # validated once only
    return row


def runner(store: BatchStore, tmp_path: Path, ran: set[str]) -> BatchRunner:
    return BatchRunner(
        store,
        DiskFileStore(tmp_path / "files"),
        LineExecutor.__new__(LineExecutor),
        BatchSettings(),
        lease_s=60,
        ledger_has=lambda rid: rid in ran,
        live_inflight=lambda: 0,
    )


def test_a_line_is_claimed_by_one_claimer_only(store: BatchStore) -> None:
    b = batch(store, 5)
    first, second = store.claim(200, 3), store.claim(200, 3)
    assert len(first) == 3 and len(second) == 2
    assert {(ln.batch_id, ln.line_no) for ln in first}.isdisjoint(
        {(ln.batch_id, ln.line_no) for ln in second}
    )
    assert store.claim(200, 3) == [] and store.open_lines(b.id) == 5


async def test_lines_of_a_dead_process_are_recovered_never_run_twice(
    store: BatchStore, tmp_path: Path
) -> None:
    b = batch(store, 2)
    one, two = store.claim(200, 2)
    r = runner(store, tmp_path, ran={one.request_id})
    r._recover(200 + 30)  # within the lease: the claims stand
    assert store.claim(300, 2) == []
    r._recover(200 + 61)  # past the lease: the process that claimed them is gone
    [(ok, line)] = store.results(b.id)
    assert not ok and orjson.loads(line)["error"]["code"] == "batch_line_interrupted"  # it ran: billed once
    [again] = store.claim(300, 2)  # the other never reached the ledger: it runs again
    assert again.request_id == two.request_id


async def test_a_cut_finalize_is_done_again_with_the_same_files(store: BatchStore, tmp_path: Path) -> None:
    b = batch(store, 1)
    [line] = store.claim(200, 1)
    store.finish(line, ok=True, result=shapes.response_line(line.custom_id, line.request_id, 200, {"x": 1}))
    r = runner(store, tmp_path, ran=set())
    assert store.transition(b.id, ["in_progress"], "finalizing", finalizing_at=201)
    row = store.get_batch(b.id)
    assert row is not None
    await r._advance(row, 202)
    done = store.get_batch(b.id)
    assert done is not None and done.status == "completed" and done.output_file_id
    assert done.output_file_id == "file-" + hashlib.sha256(f"{b.id}:output".encode()).hexdigest()[:24]
    assert (
        store.get_file("t-1", done.output_file_id) is not None
        and store.get_file("t-2", done.output_file_id) is None
    )


async def test_past_the_window_unrun_lines_expire_and_the_batch_ends_expired(
    store: BatchStore, tmp_path: Path
) -> None:
    b = batch(store, 3)
    [first] = store.claim(200, 1)
    store.finish(first, ok=True, result=shapes.response_line(first.custom_id, first.request_id, 200, {}))
    row = store.get_batch(b.id)
    assert row is not None
    r = runner(store, tmp_path, ran=set())
    await r._advance(row, row.expires_at - 1)  # inside the window: nothing happens
    assert store.open_lines(b.id) == 2
    await r._advance(row, row.expires_at)
    done = store.get_batch(b.id)
    assert done is not None and done.status == "expired" and done.expired_at == row.expires_at
    assert (done.total, done.completed, done.failed) == (3, 1, 2)
    assert done.output_file_id and done.error_file_id
    errors = DiskFileStore(tmp_path / "files").get(done.error_file_id).decode().splitlines()
    assert [orjson.loads(e)["error"]["code"] for e in errors] == ["batch_expired", "batch_expired"]


async def test_a_database_outage_is_logged_once_not_every_poll(
    store: BatchStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from sqlalchemy.exc import OperationalError

    r = runner(store, tmp_path, ran=set())
    r.settings = BatchSettings(poll_s=0.01)
    down = {"on": True}
    real = store.in_status

    def in_status(*statuses: str) -> list[BatchRow]:
        if down["on"]:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))
        return real(*statuses)

    store.in_status = in_status  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="tokenport.batches"):
        r.start()
        await asyncio.sleep(0.3)  # ~30 polls while the database is down
        down["on"] = False
        await asyncio.sleep(0.1)
        await r.close()
    lines = [rec.getMessage() for rec in caplog.records]
    assert sum("unavailable" in m for m in lines) == 1 and sum("answers again" in m for m in lines) == 1
    assert not any(rec.exc_info for rec in caplog.records)  # no traceback per poll
