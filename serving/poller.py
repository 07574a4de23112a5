"""A background refresh loop shared by the in-memory caches (API keys, limit policies)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


class Poller:
    """Calls `refresh` every `interval_s` seconds. While it fails the cache keeps serving what it
    has; the outage is logged once (with its traceback) and its end once, not on every tick."""

    def __init__(
        self, name: str, interval_s: float, refresh: Callable[[], Awaitable[None]], log: logging.Logger
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._refresh = refresh
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._refresh()
            except Exception:  # noqa: BLE001 - any failure: keep serving from the cache
                if not failing:
                    self._log.exception("%s failed; serving from the cache until it works again", self.name)
                failing = True
            else:
                if failing:
                    self._log.warning("%s works again", self.name)
                failing = False
