"""The worker pool: which workers serve which model, their health, and selection.

A worker is healthy when its last `GET /health` answered 200 (checked every `health_interval_s`)
and it has not failed a request since. Selection picks the healthy worker with the fewest requests
in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from serving.errors import ModelNotFound, NoHealthyWorker

log = logging.getLogger("tokenport.pool")


@dataclass(eq=False)
class Worker:
    id: str
    model: str
    url: str
    region: str
    healthy: bool = False
    inflight: int = 0
    failures: int = field(default=0)


class WorkerPool:
    def __init__(
        self,
        workers: Iterable[Worker],
        *,
        interval_s: float = 2.0,
        on_health: Callable[[Worker], None] | None = None,
    ) -> None:
        self.workers = list(workers)
        self._by_model: dict[str, list[Worker]] = {}
        for w in self.workers:
            self._by_model.setdefault(w.model, []).append(w)
        self._interval = interval_s
        self._on_health = on_health
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def models(self) -> list[str]:
        return list(self._by_model)

    def serves(self, model: str) -> bool:
        return model in self._by_model

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="worker-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def pick(self, model: str, exclude: Iterable[Worker] = ()) -> Worker:
        workers = self._by_model.get(model)
        if not workers:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.", param="model"
            )
        skip = set(exclude)
        healthy = [w for w in workers if w.healthy and w not in skip]
        if not healthy:
            raise NoHealthyWorker(f"No healthy worker is serving '{model}' right now; retry shortly.")
        return min(healthy, key=lambda w: w.inflight)

    def ready(self) -> bool:
        return all(any(w.healthy for w in ws) for ws in self._by_model.values())

    def mark_failed(self, worker: Worker) -> None:
        worker.failures += 1
        self._set(worker, False)

    def _set(self, worker: Worker, healthy: bool) -> None:
        if worker.healthy != healthy:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "worker %s (%s) is now %s",
                worker.id,
                worker.url,
                "healthy" if healthy else "UNHEALTHY",
            )
        worker.healthy = healthy
        if self._on_health is not None:
            self._on_health(worker)

    async def check(self, worker: Worker) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                worker.url + "/health", timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                self._set(worker, resp.status == 200)
        except (TimeoutError, aiohttp.ClientError, OSError):
            self._set(worker, False)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_all()
