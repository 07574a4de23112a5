"""The ledger: asynchronous, group-committed, idempotent appends of usage events.

`await ledger.append(event)` returns once the event is durable: committed to the database, or —
when the database cannot be reached — written and fsync'd to the local spool file, from which it is
replayed (idempotently, by request id) once the database answers again. Events that arrive while a
commit is running are committed together in the next transaction (group commit), so commit-before-
respond costs one transaction per batch, not per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import orjson
from sqlalchemy.exc import SQLAlchemyError

from metering.events import Outcome, UsageEvent
from metering.store_sql import UsageStore

log = logging.getLogger("tokenport.ledger")


class LedgerUnavailable(Exception):
    """The database is unreachable and the ledger is configured to fail closed."""


def event_to_json(event: UsageEvent) -> bytes:
    d = asdict(event)
    d["outcome"] = event.outcome.value
    d["started_at"] = event.started_at.isoformat()
    d["finished_at"] = event.finished_at.isoformat()
    return orjson.dumps(d)


def event_from_json(raw: bytes) -> UsageEvent:
    d = orjson.loads(raw)
    d["outcome"] = Outcome(d["outcome"])
    d["started_at"] = datetime.fromisoformat(d["started_at"])
    d["finished_at"] = datetime.fromisoformat(d["finished_at"])
    return UsageEvent(**d)


class Spool:
    """An append-only JSONL file of events not yet in the database (fsync'd on every write)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, events: list[UsageEvent]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(b"".join(event_to_json(e) + b"\n" for e in events))
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[UsageEvent]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().splitlines():
            if line.strip():
                try:
                    out.append(event_from_json(line))
                except (ValueError, TypeError, KeyError):
                    log.error("spool %s: skipping an unreadable line (torn write?)", self.path)
        return out

    def replay(self, store: UsageStore) -> int:
        """Move spooled events into the store; returns how many were new. Safe to repeat."""
        events = self.read()
        if not events:
            return 0
        stored = store.append_batch(events)
        self.path.unlink()
        return len(stored)


class Ledger:
    def __init__(self, store: UsageStore, spool: Spool, *, fail_closed: bool = False, max_batch: int = 512,
                 on_commit: Callable[[float, int], None] | None = None) -> None:
        self.store = store
        self.spool = spool
        self.fail_closed = fail_closed
        self.max_batch = max_batch
        self._on_commit = on_commit
        self._queue: asyncio.Queue[tuple[UsageEvent, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._spooled = False

    async def start(self) -> None:
        if self.spool.path.exists():
            await self._replay()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Flush everything queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def append(self, event: UsageEvent) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, fut))
        await fut

    def append_nowait(self, event: UsageEvent) -> asyncio.Future[None]:
        """Queue an event without waiting (for paths that must not await, e.g. under cancellation)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, fut))
        return fut

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            events = [e for e, _ in items]
            error: BaseException | None = None
            t0 = time.perf_counter()
            try:
                if self._spooled:
                    await self._replay()
                await asyncio.to_thread(self.store.append_batch, events)
            except SQLAlchemyError as exc:
                log.error("ledger database error (%s); %s", exc.__class__.__name__,
                          "failing closed" if self.fail_closed else "spooling to " + str(self.spool.path))
                if self.fail_closed:
                    error = LedgerUnavailable("the usage ledger is unavailable")
                else:
                    try:
                        await asyncio.to_thread(self.spool.write, events)
                        self._spooled = True
                    except OSError as spool_exc:
                        error = spool_exc
            except BaseException as exc:  # noqa: BLE001 - resolve waiters, then re-raise below
                error = exc
            if self._on_commit is not None:
                self._on_commit(time.perf_counter() - t0, len(events))
            for _, fut in items:
                if not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)
                self._queue.task_done()
            if isinstance(error, asyncio.CancelledError):
                raise error

    async def _replay(self) -> None:
        try:
            n = await asyncio.to_thread(self.spool.replay, self.store)
            self._spooled = False
            if n:
                log.warning("replayed %d spooled usage events into the ledger", n)
        except SQLAlchemyError:
            self._spooled = True
