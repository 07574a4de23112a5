"""The ledger: asynchronous, group-committed, idempotent appends of usage events.

`await ledger.append(event)` returns once the event is durable: committed to the database, or —
when the database cannot be reached — written and fsync'd to the local spool file, from which it is
replayed (idempotently, by request id) once the database answers again. Events that arrive while a
commit is running are committed together in the next transaction (group commit), so commit-before-
respond costs one transaction per batch, not per request.

Commits run on one long-lived writer thread owned by the ledger (the database calls block). On the
event loop, `append` adds (event, future) to a list; once per loop iteration that list goes to the
thread's queue as one item (so everything appended in one iteration wakes the thread once and lands
in one transaction, as when the writer was a task on the loop). The thread takes everything queued
(up to `max_batch` per transaction), commits it and hands the whole batch back to the loop with one
`call_soon_threadsafe`, where `on_commit` runs, the subscribers hear of each event and the futures
are resolved. No executor, no thread hop per batch on the loop's side.

Subscribers (`subscribe(committed, refused)`) are how the rest of the gateway learns what became of
an event (metrics, budget settlement, the spend estimate), without the ledger knowing them.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from metering.event_codec import codec
from metering.events import UsageEvent
from metering.store_sql import UsageStore

log = logging.getLogger("tokenport.ledger")


class LedgerUnavailable(Exception):
    """The database is unreachable and the ledger is configured to fail closed."""


EventSubscriber = Callable[[UsageEvent], None]


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
        data = b"".join(codec().to_json(e) + b"\n" for e in events)
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
                out.append(codec().from_json(line))
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


_STOP = object()  # put on the writer's queue by close(): flush what is queued, then exit

_Item = tuple[UsageEvent, "asyncio.Future[None]"]


class Ledger:
    def __init__(self, store: UsageStore, spool: Spool, *, fail_closed: bool = False, max_batch: int = 512,
                 on_commit: Callable[[float, int], None] | None = None, replay_interval_s: float = 2.0,
                 checkpoint_interval_s: float = 1.0) -> None:
        self.store = store
        self.spool = spool
        self.fail_closed = fail_closed
        self.max_batch = max_batch
        self._on_commit = on_commit
        self.replay_interval_s = replay_interval_s
        self._pending: list[_Item] = []  # appended during this loop iteration (loop thread only)
        self._inbox: queue.SimpleQueue[list[_Item] | object] = queue.SimpleQueue()  # to the writer thread
        self._thread: threading.Thread | None = None
        self.checkpoint_interval_s = checkpoint_interval_s
        self._checkpointer: threading.Thread | None = None
        self._checkpoints_stop = threading.Event()
        self._stopped: asyncio.Future[None] | None = None
        self._spooled = False  # written and read by the writer thread only while it runs
        self.available = True  # False from a failed commit until the database answers again
        self._last_probe = 0.0
        self._subscribers: list[tuple[EventSubscriber, EventSubscriber | None]] = []

    def subscribe(self, committed: EventSubscriber, refused: EventSubscriber | None = None) -> None:
        """`committed(event)` runs (on the event loop) once the event is durable, stored or spooled;
        `refused(event)` when the ledger refused it (failing closed, or the spool could not be written
        either): nothing of it was recorded. In the order subscribed, before the appender wakes up."""
        self._subscribers.append((committed, refused))

    async def start(self) -> None:
        if self.spool.pending():
            await self._replay()
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(target=self._writer, args=(loop, self._stopped), name="ledger-writer",
                                        daemon=True)
        self._thread.start()
        if self.checkpoint_interval_s > 0 and self.store.checkpoint_in_background():
            self._checkpoints_stop = threading.Event()
            self._checkpointer = threading.Thread(target=self._checkpoints, args=(self._checkpoints_stop,),
                                                  name="ledger-checkpoints", daemon=True)
            self._checkpointer.start()

    def _checkpoints(self, stop: threading.Event) -> None:
        """SQLite WAL checkpoints, off the commit path (UsageStore.checkpoint_in_background)."""
        failing = False
        while not stop.wait(self.checkpoint_interval_s):
            try:
                self.store.checkpoint()
                failing = False
            except (sqlite3.Error, SQLAlchemyError, OSError) as exc:  # next round tries again; the WAL grows meanwhile
                if not failing:
                    log.warning("ledger WAL checkpoint failed: %s", exc)
                failing = True

    async def close(self) -> None:
        """Flush everything queued (and replay the spool if the database is back), then stop."""
        if self._thread is None or self._stopped is None:
            return
        self._flush()
        self._inbox.put(_STOP)
        await asyncio.shield(self._stopped)
        self._thread.join(5.0)  # it has posted its last callback: returns at once
        self._thread = self._stopped = None
        if self._checkpointer is not None:
            self._checkpoints_stop.set()
            self._checkpointer.join(5.0)
            self._checkpointer = None
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
        await self.append_nowait(event)

    def append_nowait(self, event: UsageEvent) -> asyncio.Future[None]:
        """Queue an event without waiting (for paths that must not await, e.g. under cancellation)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((event, fut))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """Hand what was appended during this loop iteration to the writer thread."""
        if self._pending:
            batch, self._pending = self._pending, []
            self._inbox.put(batch)

    # --- the writer thread ----------------------------------------------------------------------
    def _writer(self, loop: asyncio.AbstractEventLoop, stopped: asyncio.Future[None]) -> None:
        try:
            self._drain(loop)
        finally:
            try:
                loop.call_soon_threadsafe(_set_done, stopped)
            except RuntimeError:  # the loop is closed: nobody waits for us
                pass

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        inbox = self._inbox
        stopping = False
        queued: list[_Item] = []  # taken from the inbox, not committed yet (in order)
        while True:
            if not queued:
                try:
                    if stopping:  # close(): commit what is queued, then exit
                        got = inbox.get_nowait()
                    elif self._spooled:  # retry the spool even when no request comes in
                        got = inbox.get(timeout=self.replay_interval_s)
                    else:
                        got = inbox.get()
                except queue.Empty:
                    if stopping:
                        return
                    try:
                        self._replay_now()
                    except Exception:  # the writer must outlive any failure: appends would hang
                        log.exception("replaying the usage spool failed")
                    continue
                if got is _STOP:
                    stopping = True
                    continue
                queued = got  # type: ignore[assignment]
            while len(queued) < self.max_batch:  # group commit: everything queued meanwhile
                try:
                    got = inbox.get_nowait()
                except queue.Empty:
                    break
                if got is _STOP:
                    stopping = True
                else:
                    queued.extend(got)  # type: ignore[arg-type]
            items, queued = queued[:self.max_batch], queued[self.max_batch:]
            error, seconds = self._commit([e for e, _ in items])
            try:
                loop.call_soon_threadsafe(self._resolve, items, error, seconds)
            except RuntimeError:  # the loop is closed: nobody waits for these futures
                return
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit: end the thread

    def _commit(self, events: list[UsageEvent]) -> tuple[BaseException | None, float]:
        """Commit one batch (on the writer thread): None, or the error each waiter gets."""
        error: BaseException | None = None
        t0 = time.perf_counter()
        try:
            if self._spooled:
                self._replay_now()
            self.store.append_batch(events)
            self.available = True
        except SQLAlchemyError as exc:
            self.available = False
            log.error("ledger database error (%s); %s", exc.__class__.__name__,
                      "failing closed" if self.fail_closed else "spooling to " + str(self.spool.path))
            if self.fail_closed:
                error = LedgerUnavailable("the usage ledger is unavailable")
            else:
                try:
                    self.spool.write(events)
                    self._spooled = True
                except OSError as spool_exc:
                    error = spool_exc
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters
            error = exc
        return error, time.perf_counter() - t0

    def _resolve(self, items: list[_Item], error: BaseException | None, seconds: float) -> None:
        """On the loop: report the commit, tell the subscribers, then wake every waiter of the batch."""
        if self._on_commit is not None:
            try:
                self._on_commit(seconds, len(items))
            except Exception:
                log.exception("ledger on_commit callback failed")
        for committed, refused in self._subscribers:
            hear = committed if error is None else refused
            if hear is None:
                continue
            for event, _ in items:
                try:
                    hear(event)
                except Exception:
                    log.exception("ledger subscriber %r failed on %s", hear, event.request_id)
        for _, fut in items:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    async def _replay(self) -> None:
        await asyncio.to_thread(self._replay_now)

    def _replay_now(self) -> None:
        try:
            n = self.spool.replay(self.store)
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


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
