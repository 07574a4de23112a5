"""The worker pool: which workers serve which model, their health, and selection.

A worker is healthy when its last `GET /health` answered 200 (checked every `health_interval_s`)
and it has not failed a request since. Each check also reads the worker's own queue (vLLM's
`num_requests_running` + `num_requests_waiting` from its `/metrics`). Selection among the healthy
workers follows `gateway.routing` (serving/proxy/routing.py): least loaded, or prefix/session
affinity with a load bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from serving.errors import ModelNotFound, NoHealthyWorker
from serving.proxy import routing

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
    queued: int = 0  # vLLM's running + waiting requests at the last check (other gateways' too)


class WorkerPool:
    def __init__(
        self,
        workers: Iterable[Worker],
        *,
        interval_s: float = 2.0,
        on_health: Callable[[Worker], None] | None = None,
        routing: str = "least_loaded",
    ) -> None:
        self.routing = routing  # least_loaded | prefix_affinity
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

    def pick(self, model: str, exclude: Iterable[Worker] = (), key: str | None = None) -> Worker:
        """A healthy worker of `model` not in `exclude`; `key` (routing.affinity_key) keeps a
        conversation on one worker under `prefix_affinity`."""
        workers = self._by_model.get(model)
        if not workers:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.", param="model"
            )
        skip = set(exclude)
        healthy = [w for w in workers if w.healthy and w not in skip]
        if not healthy:
            raise NoHealthyWorker(f"No healthy worker is serving '{model}' right now; retry shortly.")
        chosen = routing.choose(healthy, key if self.routing == "prefix_affinity" else None)
        assert isinstance(chosen, Worker)
        return chosen

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
            return
        if self.routing == "least_loaded" and len(self._by_model.get(worker.model, ())) < 2:
            return  # one worker: nothing to choose between
        try:
            async with self._session.get(
                worker.url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                if resp.status == 200:
                    worker.queued = routing.vllm_queue(await resp.read())
        except (TimeoutError, aiohttp.ClientError, OSError):
            worker.queued = 0  # no metrics (not vLLM): the gateway's own count decides

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_all()
