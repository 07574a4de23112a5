"""The ledger's spool: usage events written to local files while the database cannot take them.

One open file (`path`, JSON lines, fsync'd on every write) collects the events of an outage; it is
sealed (renamed to `<name>.<time_ns>-<pid>`) when it reaches `max_bytes` or when a replay starts
on it, so an outage leaves one file, or one per `max_bytes`, however many commits it spans.

A replay moves the events into the store in order: the sealed files oldest first, then the open
file. Each file is read once and stored in chunks of `chunk` events (one transaction each; request
ids already stored are skipped), then deleted: O(n) work for n spooled events. A replay tries the
database with the open file's first chunk before it seals the file, so an attempt made while the
database is still down renames nothing and leaves no file behind.

Several gateway processes may share one data_dir. A writer appends under an exclusive flock on the
open file (sealing happens under it too, so a sealed file never changes) and reopens the path if
the file was sealed between its open and its lock. One process replays at a time (a flock on the
spool's folder; the others skip), which keeps the order. A replay cut short by a crash leaves
sealed files, replayed first by the next one; `<name>.replay-*` files left by the former spool (one
file per commit attempt) come before all others.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from metering.event_codec import codec
from metering.events import UsageEvent

log = logging.getLogger("tokenport.ledger")

MAX_BYTES = 64 * 1024 * 1024  # a sealed file's size: a day's outage at ~2,000 requests/s is ~250 files
CHUNK = 2000  # events per replay transaction


class AppendStore(Protocol):
    def append_batch(self, events: Sequence[UsageEvent]) -> list[str]: ...


class Spool:
    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, chunk: int = CHUNK) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.chunk = chunk

    # --- writing -----------------------------------------------------------------------------------
    def write(self, events: Sequence[UsageEvent]) -> None:
        """Append the events to the open file and fsync it; seal it once it holds `max_bytes`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(codec().to_json(e) + b"\n" for e in events)
        while True:
            with open(self.path, "ab") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    if not _same_file(f.fileno(), self.path):
                        continue  # sealed between open and lock: write to the new open file
                    created = f.tell() == 0
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                    if f.tell() >= self.max_bytes:
                        self._seal_locked()
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            if created:
                _fsync_dir(self.path.parent)
            return

    def _seal_locked(self) -> Path:
        """Rename the open file aside (the caller holds its flock)."""
        sealed = self.path.with_name(f"{self.path.name}.{time.time_ns():020d}-{os.getpid()}")
        os.replace(self.path, sealed)
        _fsync_dir(self.path.parent)
        return sealed

    # --- reading -----------------------------------------------------------------------------------
    def sealed(self) -> list[Path]:
        """The sealed files, oldest first (the former spool's `.replay-*` files before all others)."""
        prefix = self.path.name + "."
        found = [p for p in self.path.parent.glob(prefix + "*") if p.name != self.path.name]
        return sorted(found, key=lambda p: (not p.name.startswith(prefix + "replay-"), p.name))

    def files(self) -> list[Path]:
        return [*self.sealed(), *([self.path] if self.path.exists() else [])]

    def pending(self) -> bool:
        return bool(self.files())

    def read(self) -> list[UsageEvent]:
        """Every spooled event not replayed yet, in order (for inspection and tests)."""
        out: list[UsageEvent] = []
        for p in self.files():
            try:
                out.extend(_read_events(p.read_bytes()))
            except FileNotFoundError:
                continue
        return out

    # --- replaying ---------------------------------------------------------------------------------
    def replay(self, store: AppendStore) -> int:
        """Move the spooled events into the store, in order; returns how many were new. Safe to repeat
        and to run from several processes at once (one replays, the others return 0 at once). Raises
        what the store raised (SQLAlchemyError when the database fails), keeping every file not
        replayed completely."""
        if not self.path.parent.is_dir():
            return 0
        lock = os.open(self.path.parent, os.O_RDONLY)  # the folder's flock: no file of its own left behind
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is replaying: it takes these events too, in order
            return self._replay_locked(store)
        finally:
            os.close(lock)  # releases the flock

    def _replay_locked(self, store: AppendStore) -> int:
        """The replay, under the folder's flock."""
        stored = 0
        while True:
            stored += sum(self._replay_file(p, store) for p in self.sealed())
            try:
                f = open(self.path, "rb")  # noqa: SIM115 - held open for its lock
            except FileNotFoundError:
                return stored
            with f:
                if self.sealed():
                    # a writer sealed the open file after the listing above: that file is older than
                    # the one just opened, so it goes first (its events, then this file's)
                    continue
                head = _read_events(
                    b"".join(
                        line for line in (f.readline() for _ in range(self.chunk)) if line.endswith(b"\n")
                    )
                )
                if head:  # try the database first: a failed attempt (it raises) renames nothing
                    stored += len(store.append_batch(head))
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # once no writer is appending to it
                if _same_file(f.fileno(), self.path):
                    self._seal_locked()
            # sealed now, by us or by a writer (size): replay it and whatever was sealed after it
            return stored + sum(self._replay_file(p, store) for p in self.sealed())

    def _replay_file(self, path: Path, store: AppendStore) -> int:
        """Store a sealed file's events (no writer touches a sealed file) in chunks, then delete it."""
        events = _read_events(path.read_bytes())
        stored = 0
        for i in range(0, len(events), self.chunk):
            stored += len(store.append_batch(events[i : i + self.chunk]))
        path.unlink()
        return stored


def _read_events(data: bytes) -> list[UsageEvent]:
    out = []
    c = codec()
    for line in data.splitlines():
        if line.strip():
            try:
                out.append(c.from_json(line))
            except (ValueError, TypeError, KeyError):
                log.error("usage spool: skipping an unreadable line (torn write?)")
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
