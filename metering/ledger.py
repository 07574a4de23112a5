"""The ledger: asynchronous, group-committed, idempotent appends of usage events.

`await ledger.append(event)` returns once the event is durable: committed to the database, or —
when the database cannot be reached — written and fsync'd to the local spool file, from which it is
replayed (idempotently, by request id) once the database answers again. Events that arrive while a
commit is running are committed together in the next transaction (group commit), so commit-before-
respond costs one transaction per batch, not per request.
"""

from __future__ import annotations

import asyncio
import fcntl
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
    """An append-only JSONL file of events not yet in the database (fsync'd on every write).

    Several gateway processes may share one data_dir. A writer appends under an exclusive flock. A
    replay first renames the file aside (later writes start a new file), takes the lock on the
    renamed file (so a writer still appending to it finishes first), stores its events (idempotent
    by request id), and deletes it. A writer whose open file was renamed away reopens the path. A
    replay cut short by a crash leaves `<name>.replay-*` files, picked up by the next replay.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, events: list[UsageEvent]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(event_to_json(e) + b"\n" for e in events)
        while True:
            with open(self.path, "ab") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    if not _same_file(f.fileno(), self.path):
                        continue  # renamed aside for a replay between open and lock: use the new file
                    created = f.tell() == 0
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            if created:
                _fsync_dir(self.path.parent)
            return

    def _aside(self) -> list[Path]:
        return sorted(self.path.parent.glob(self.path.name + ".replay-*"))

    def pending(self) -> bool:
        return self.path.exists() or bool(self._aside())

    def read(self) -> list[UsageEvent]:
        """Every spooled event not replayed yet (for inspection and tests)."""
        out: list[UsageEvent] = []
        for p in [*self._aside(), self.path]:
            if p.exists():
                out.extend(_read_events(p))
        return out

    def replay(self, store: UsageStore) -> int:
        """Move spooled events into the store; returns how many were new. Safe to repeat and to run
        from several processes at once. Raises SQLAlchemyError (leaving the files) if the store fails."""
        mine = self.path.with_name(f"{self.path.name}.replay-{os.getpid()}-{time.time_ns()}")
        try:
            os.replace(self.path, mine)
        except FileNotFoundError:
            pass
        stored = 0
        for p in self._aside():
            try:
                f = open(p, "rb")  # noqa: SIM115 - held open for its lock
            except FileNotFoundError:
                continue  # another process replayed it meanwhile
            with f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX if p == mine else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process is replaying it right now
                if not p.exists():
                    continue
                events = _read_events(p)
                if events:
                    stored += len(store.append_batch(events))
                p.unlink()
        return stored


def _read_events(path: Path) -> list[UsageEvent]:
    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            try:
                out.append(event_from_json(line))
            except (ValueError, TypeError, KeyError):
                log.error("spool %s: skipping an unreadable line (torn write?)", path)
    return out


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    def __init__(self, store: UsageStore, spool: Spool, *, fail_closed: bool = False, max_batch: int = 512,
                 on_commit: Callable[[float, int], None] | None = None, replay_interval_s: float = 2.0) -> None:
        self.store = store
        self.spool = spool
        self.fail_closed = fail_closed
        self.max_batch = max_batch
        self._on_commit = on_commit
        self.replay_interval_s = replay_interval_s
        self._queue: asyncio.Queue[tuple[UsageEvent, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._spooled = False
        self.available = True  # False from a failed commit until the database answers again
        self._last_probe = 0.0

    async def start(self) -> None:
        if self.spool.pending():
            await self._replay()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Flush everything queued (and replay the spool if the database is back), then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        if self._spooled:
            await self._replay()

    async def admit(self) -> None:
        """Before a request is forwarded: in fail-closed mode, raise LedgerUnavailable while the
        database is known to be down (re-probed at most once a second)."""
        if not self.fail_closed or self.available:
            return
        now = time.monotonic()
        if now - self._last_probe < 1.0:
            raise LedgerUnavailable("the usage ledger is unavailable")
        self._last_probe = now
        try:
            await asyncio.to_thread(self.store.ping)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable("the usage ledger is unavailable") from exc
        self.available = True

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
            if self._spooled:  # retry the spool even when no request comes in
                try:
                    first = await asyncio.wait_for(self._queue.get(), self.replay_interval_s)
                except TimeoutError:
                    await self._replay()
                    continue
            else:
                first = await self._queue.get()
            items = [first]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            events = [e for e, _ in items]
            error: BaseException | None = None
            t0 = time.perf_counter()
            try:
                if self._spooled:
                    await self._replay()
                await asyncio.to_thread(self.store.append_batch, events)
                self.available = True
            except SQLAlchemyError as exc:
                self.available = False
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
            self._spooled = self.spool.pending()  # another process may be replaying a file right now
            self.available = True
            if n:
                log.warning("replayed %d spooled usage events into the ledger", n)
        except SQLAlchemyError:
            self._spooled = True
            self.available = False
        except OSError as exc:
            self._spooled = True
            log.error("cannot replay the usage spool %s: %s", self.spool.path, exc)
