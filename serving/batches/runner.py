"""The batch runner: one per gateway process, started and stopped with the gateway's lifespan.

Every `poll_s` (and whenever a line ends or a batch is created or cancelled) it:
1. recovers lines claimed by a process that is gone (claim older than a request can take): a line
   whose usage event is in the ledger ran, its answer is lost: error line `batch_line_interrupted`;
   any other goes back to pending (nothing ran, nothing was billed);
2. validates new batches (validating -> in_progress: the input file's lines into the database);
3. closes lines that will never run (cancelling: `batch_cancelled`; past expires_at: `batch_expired`);
4. finalizes batches with no open line (-> finalizing -> completed | expired; cancelling -> cancelled):
   writes the output and error files (ids derived from the batch id, so a finalize cut by a restart
   is done again with the same files) and the final state in one transaction;
5. claims pending lines (serving/batches/store.py `claim`) and runs them (serving/batches/execute.py).

Priority below live traffic, by the gateway's own admission: at most `batches.concurrency` lines in
flight per process, and no new line while more than `batches.live_inflight_max` live requests are in
flight on the workers. The tenant's own limits apply to each line in the guard's admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable

import orjson
from sqlalchemy.exc import InterfaceError, OperationalError

from serving.batches import shapes
from serving.batches.execute import Done, Interrupted, LineExecutor, PutBack
from serving.batches.files import FileStore
from serving.batches.store import BatchRow, BatchStore, FileRow, LineRow
from serving.settings import BatchSettings

log = logging.getLogger("tokenport.batches")


class BatchRunner:
    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        executor: LineExecutor,
        settings: BatchSettings,
        *,
        lease_s: float,
        ledger_has: Callable[[str], bool],
        live_inflight: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.files = files
        self.executor = executor
        self.settings = settings
        self.lease_s = lease_s
        self.ledger_has = ledger_has
        self.live_inflight = live_inflight
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lines: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-runner")

    def wake(self) -> None:
        self._wake.set()

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop claiming; give running lines `grace_s` to end, then interrupt them (each is settled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lines:
            _done, late = await asyncio.wait(self._lines, timeout=grace_s)
            for t in late:
                t.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)

    async def _loop(self) -> None:
        db_down = False  # a database outage is logged once, when it starts and when it ends
        while True:
            try:
                await self.tick()
                if db_down:
                    log.warning("batch runner: the database answers again; batches carry on")
                db_down = False
            except (OperationalError, InterfaceError) as exc:  # down or unreachable: retried each poll
                if not db_down:
                    log.warning("batch runner: the database is unavailable (%s); retrying", exc.orig)
                db_down = True
            except Exception:
                log.exception("batch runner tick failed")
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 a cancel (close) that lands as wait_for's
            # own timeout fires became a TimeoutError, swallowed here, and the loop ran on (a close
            # that hung until the server's shutdown deadline, seen in tests living ~poll_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_s):
                    await self._wake.wait()

    async def tick(self) -> None:
        now = int(self.clock())
        await asyncio.to_thread(self._recover, now)
        for b in await asyncio.to_thread(self.store.in_status, "validating"):
            await self._validate(b, now)
        for b in await asyncio.to_thread(self.store.in_status, "in_progress", "cancelling", "finalizing"):
            await self._advance(b, now)
        await self._claim(now)

    # --- 1. recovery ---------------------------------------------------------------------------
    def _recover(self, now: int) -> None:
        for line in self.store.stale(now - int(self.lease_s)):
            if self.ledger_has(line.request_id):
                self.store.finish(line, ok=False, result=_interrupted(line))
            else:
                self.store.put_back(line, now)

    # --- 2. validation -------------------------------------------------------------------------
    async def _validate(self, b: BatchRow, now: int) -> None:
        f = await asyncio.to_thread(self.store.get_file, b.tenant_id, b.input_file_id)
        try:
            if f is None:
                raise FileNotFoundError(b.input_file_id)
            data = await asyncio.to_thread(self.files.get, f.storage_key)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("batch %s: input file unreadable: %s", b.id, exc)
            errors = orjson.dumps(
                [
                    {
                        "code": "file_unreadable",
                        "line": None,
                        "param": "input_file_id",
                        "message": f"The input file {b.input_file_id} could not be read.",
                    }
                ]
            ).decode()
            await asyncio.to_thread(
                self.store.transition, b.id, ["validating"], "failed", failed_at=now, errors=errors
            )
            return
        lines = shapes.parse_input(text, b.endpoint)
        await asyncio.to_thread(self.store.start, b.id, lines, now)

    # --- 3./4. closing and finalizing ----------------------------------------------------------
    async def _advance(self, b: BatchRow, now: int) -> None:
        if b.status == "in_progress" and now >= b.expires_at:
            if b.expired_at is None:
                await asyncio.to_thread(self.store.set_values, b.id, expired_at=now)
            await self._close_pending(
                b, "batch_expired", "This request could not be executed before the completion window expired."
            )
        elif b.status == "cancelling":
            await self._close_pending(
                b, "batch_cancelled", "The batch was cancelled before this request ran."
            )
        if b.status != "finalizing":
            still_open: int = await asyncio.to_thread(self.store.open_lines, b.id)
            if still_open:
                return
        if b.status == "in_progress" and not await asyncio.to_thread(
            self.store.transition, b.id, ["in_progress"], "finalizing", finalizing_at=now
        ):
            return
        await self._finalize(b, now)

    async def _close_pending(self, b: BatchRow, code: str, message: str) -> None:
        pending = await asyncio.to_thread(self.store.pending, b.id)
        if pending:
            results = {
                (ln.batch_id, ln.line_no): shapes.error_line(ln.custom_id, ln.request_id, code, message)
                for ln in pending
            }
            await asyncio.to_thread(self.store.close_pending, results)

    async def _finalize(self, b: BatchRow, now: int) -> None:
        results = await asyncio.to_thread(self.store.results, b.id)
        ok = [line for good, line in results if good]
        bad = [line for good, line in results if not good]
        files: list[FileRow] = []
        ids: dict[str, str | None] = {}
        for kind, lines in (("output", ok), ("error", bad)):
            if not lines:
                ids[kind] = None
                continue
            data = ("\n".join(lines) + "\n").encode()
            fid = "file-" + hashlib.sha256(f"{b.id}:{kind}".encode()).hexdigest()[:24]
            await asyncio.to_thread(self.files.put, fid, data)
            files.append(
                FileRow(fid, b.tenant_id, "batch_output", f"{b.id}_{kind}.jsonl", len(data), now, fid)
            )
            ids[kind] = fid
        if b.status == "cancelling":
            source, final, stamp = "cancelling", "cancelled", "cancelled_at"
        else:
            current = await asyncio.to_thread(self.store.get_batch, b.id)
            expired = current is not None and current.expired_at is not None
            source, final, stamp = (
                "finalizing",
                "expired" if expired else "completed",
                ("expired_at" if expired else "completed_at"),
            )
        values: dict[str, object] = {
            "output_file_id": ids["output"],
            "error_file_id": ids["error"],
            "total": len(results),
            "completed": len(ok),
            "failed": len(bad),
        }
        if stamp != "expired_at":
            values[stamp] = now
        if await asyncio.to_thread(self.store.finalize, b.id, [source], final, files, **values):
            log.info("batch %s %s: %d ok, %d failed", b.id, final, len(ok), len(bad))

    # --- 5. running lines ----------------------------------------------------------------------
    async def _claim(self, now: int) -> None:
        free = self.settings.concurrency - len(self._lines)
        if free <= 0:
            return
        live = self.live_inflight() - len(self._lines)
        if live > self.settings.live_inflight_max:
            self._soon()  # live traffic first: look again shortly
            return
        lines = await asyncio.to_thread(self.store.claim, now, free)
        batches: dict[str, BatchRow | None] = {}
        for line in lines:
            if line.batch_id not in batches:
                batches[line.batch_id] = await asyncio.to_thread(self.store.get_batch, line.batch_id)
            b = batches[line.batch_id]
            if b is None:
                continue
            task = asyncio.create_task(self._run(b, line), name=f"batch-line-{line.request_id}")
            self._lines.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._lines.discard(task)
        self._wake.set()

    def _soon(self) -> None:
        asyncio.get_running_loop().call_later(0.05, self._wake.set)

    async def _run(self, b: BatchRow, line: LineRow) -> None:
        try:
            outcome = await self.executor.run(b.tenant_id, b.key_id, b.endpoint, line, self.settings.retry_s)
        except Interrupted as exc:  # the gateway is stopping
            outcome = Done(False, _interrupted(line)) if exc.recorded else PutBack(0)
        except Exception:
            log.exception("batch %s line %d failed", b.id, line.line_no)
            outcome = Done(
                False,
                shapes.error_line(
                    line.custom_id,
                    line.request_id,
                    "internal_error",
                    "The gateway failed to run this request.",
                ),
            )
        if isinstance(outcome, Done):
            await asyncio.to_thread(self.store.finish, line, ok=outcome.ok, result=outcome.line)
        else:
            await asyncio.to_thread(self.store.put_back, line, int(self.clock() + outcome.retry_after_s))


def _interrupted(line: LineRow) -> str:
    return shapes.error_line(
        line.custom_id,
        line.request_id,
        "batch_line_interrupted",
        "The gateway stopped while this request ran; it was billed once, its answer is lost.",
    )
