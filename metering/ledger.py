"""The ledger: asynchronous, group-committed, idempotent appends of usage events.

`await ledger.append(event)` returns once the event is durable: committed to the database, or —
when the database cannot be reached, or does not answer within the store's bounded wait
(`metering.spool_after_s`) — written and fsync'd to the local spool (metering/spool.py), from which
it is replayed (in order, idempotently by request id) once the database answers again. While
events are spooled, later ones join them in the spool at once; a replay is tried at most once per
`replay_interval_s`. Events that arrive while a
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
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from metering.events import UsageEvent
from metering.spool import Spool
from metering.store_sql import UsageStore

log = logging.getLogger("tokenport.ledger")


class LedgerUnavailable(Exception):
    """The database is unreachable and the ledger is configured to fail closed."""


EventSubscriber = Callable[[UsageEvent], None]
__all__ = ["EventSubscriber", "Ledger", "LedgerUnavailable", "Spool"]

_STOP = object()  # put on the writer's queue by close(): flush what is queued, then exit

_Item = tuple[UsageEvent, "asyncio.Future[None]"]


class Ledger:
    def __init__(
        self,
        store: UsageStore,
        spool: Spool,
        *,
        fail_closed: bool = False,
        max_batch: int = 512,
        on_commit: Callable[[float, int], None] | None = None,
        replay_interval_s: float = 2.0,
        checkpoint_interval_s: float = 1.0,
    ) -> None:
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
        self._last_replay = 0.0  # monotonic time of the last replay attempt (writer thread)
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
        self._thread = threading.Thread(
            target=self._writer, args=(loop, self._stopped), name="ledger-writer", daemon=True
        )
        self._thread.start()
        if self.checkpoint_interval_s > 0 and self.store.checkpoint_in_background():
            self._checkpoints_stop = threading.Event()
            self._checkpointer = threading.Thread(
                target=self._checkpoints,
                args=(self._checkpoints_stop,),
                name="ledger-checkpoints",
                daemon=True,
            )
            self._checkpointer.start()

    def _checkpoints(self, stop: threading.Event) -> None:
        """SQLite WAL checkpoints, off the commit path (UsageStore.checkpoint_in_background)."""
        failing = False
        while not stop.wait(self.checkpoint_interval_s):
            try:
                self.store.checkpoint()
                failing = False
            except (
                sqlite3.Error,
                SQLAlchemyError,
                OSError,
            ) as exc:  # next round tries again; the WAL grows meanwhile
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
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for us
                loop.call_soon_threadsafe(_set_done, stopped)

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
            items, queued = queued[: self.max_batch], queued[self.max_batch :]
            error, seconds = self._commit([e for e, _ in items])
            try:
                loop.call_soon_threadsafe(self._resolve, items, error, seconds)
            except RuntimeError:  # the loop is closed: nobody waits for these futures
                return
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit: end the thread

    def _commit(self, events: list[UsageEvent]) -> tuple[BaseException | None, float]:
        """Commit one batch (on the writer thread): None, or the error each waiter gets.

        While events are spooled, new ones join them in the spool (in order, at once) until a replay
        (at most one per `replay_interval_s`) has emptied it; the database is not asked meanwhile.
        A database that does not answer within the store's bounded wait (`metering.spool_after_s`)
        counts as down."""
        error: BaseException | None = None
        t0 = time.perf_counter()
        try:
            if self._spooled and not self._replayed() and not self.fail_closed:
                error = self._to_spool(events)
            else:
                self.store.append_batch(events)
                self.available = True
        except SQLAlchemyError as exc:
            self.available = False
            self._last_replay = time.monotonic()
            log.error(
                "ledger database error (%s); %s",
                exc.__class__.__name__,
                "failing closed" if self.fail_closed else "spooling to " + str(self.spool.path),
            )
            error = (
                LedgerUnavailable("the usage ledger is unavailable")
                if self.fail_closed
                else self._to_spool(events)
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters
            error = exc
        return error, time.perf_counter() - t0

    def _to_spool(self, events: list[UsageEvent]) -> OSError | None:
        try:
            self.spool.write(events)
        except OSError as exc:
            return exc
        self._spooled = True
        return None

    def _replayed(self) -> bool:
        """Replay the spool if the last attempt is `replay_interval_s` old: True once it is empty."""
        if time.monotonic() - self._last_replay < self.replay_interval_s:
            return False
        self._replay_now()
        return not self._spooled

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
        self._last_replay = time.monotonic()
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
