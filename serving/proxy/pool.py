"""The worker pool: which workers serve which model, their health, and selection.

A worker is healthy when its last `GET /health` answered 200 (checked every `health_interval_s`)
and it has not failed a request since. Each check also reads the worker's own queue (vLLM's
`num_requests_running` + `num_requests_waiting` from its `/metrics`). Selection among the healthy
workers follows `gateway.routing` (serving/proxy/routing.py): least loaded, or prefix/session
affinity with a load bound.

Outlier ejection: a worker that fails `eject_after` requests in a row (connection errors and 5xx
answers) is ejected for `eject_base_s`, doubled at each ejection in a row up to `eject_max_s`; health
checks do not bring it back before that, a success resets the count. Workers change without a
restart (`replace`, fed by serving/proxy/discovery.py): a new one is checked and joins, a removed one
is **draining**: it gets no new request, its requests in flight (streams too) finish, then it goes.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
    failures: int = field(default=0)  # failed requests in a row
    queued: int = 0  # vLLM's running + waiting requests at the last check (other gateways' too)
    kv_usage: float = 0.0  # vLLM's KV-cache usage (0..1) at the last check
    draining: bool = False  # removed from the set: no new requests, gone when its last one ends
    ejected_until: float = 0.0  # time.monotonic(): out of the pool until then (outlier ejection)
    ejections: int = 0  # ejections in a row (each doubles the next one's length)
    # A router (vLLM production-stack router, an InferencePool behind Envoy) rather than an engine:
    # health from `health_path`, no /metrics scrape, never ejected, not reconciled.
    router: bool = False
    health_path: str = "/health"


class WorkerPool:
    def __init__(
        self,
        workers: Iterable[Worker],
        *,
        interval_s: float = 2.0,
        on_health: Callable[[Worker], None] | None = None,
        routing: str = "least_loaded",
        eject_after: int = 3,
        eject_base_s: float = 5.0,
        eject_max_s: float = 300.0,
        on_eject: Callable[[Worker], None] | None = None,
        on_gone: Callable[[Worker], None] | None = None,
        models: Iterable[str] = (),
    ) -> None:
        self.routing = routing  # least_loaded | prefix_affinity
        self.eject_after, self.eject_base_s, self.eject_max_s = eject_after, eject_base_s, eject_max_s
        self._on_eject, self._on_gone = on_eject, on_gone
        self.workers = list(workers)
        # models served even with no worker yet (a workers file may give them some later)
        self._by_model: dict[str, list[Worker]] = {m: [] for m in models}
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
        if workers is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.", param="model"
            )
        healthy = self._takers(workers, exclude)
        if not healthy:
            raise NoHealthyWorker(f"No healthy worker is serving '{model}' right now; retry shortly.")
        chosen = routing.choose(healthy, key if self.routing == "prefix_affinity" else None)
        assert isinstance(chosen, Worker)
        return chosen

    def has_other(self, model: str, tried: Iterable[Worker]) -> bool:
        """Another healthy worker of `model` could take the request (a retry after a 502/503)."""
        return bool(self._takers(self._by_model.get(model, ()), tried))

    @staticmethod
    def _takers(workers: Iterable[Worker], exclude: Iterable[Worker]) -> list[Worker]:
        """The workers that may take a new request: healthy, not draining, not already tried."""
        skip = set(exclude)
        return [w for w in workers if w.healthy and not w.draining and w not in skip]

    def ready(self) -> bool:
        """Every model that has workers has a healthy one (a model given no worker yet, waiting for
        the workers file, does not hold the others back), and some worker is healthy."""
        active = [[w for w in ws if not w.draining] for ws in self._by_model.values()]
        return any(w.healthy for ws in active for w in ws) and all(
            any(w.healthy for w in ws) for ws in active if ws
        )

    def mark_failed(self, worker: Worker) -> None:
        """The worker broke a connection: out until its next good health check (or its ejection)."""
        self.note_failure(worker)
        self._set(worker, False)

    def note_failure(self, worker: Worker) -> None:
        """A failed request (a connection error or a 5xx answer): the `eject_after`-th in a row ejects."""
        worker.failures += 1
        if worker.router:
            return  # a router is the only way to its pods: never ejected, health checks decide
        if worker.failures >= self.eject_after and worker.ejected_until <= time.monotonic():
            length = min(self.eject_base_s * 2**worker.ejections, self.eject_max_s)
            worker.ejected_until = time.monotonic() + length
            worker.ejections += 1
            log.warning(
                "worker %s (%s) ejected for %.0f s after %d failed requests in a row",
                worker.id,
                worker.url,
                length,
                worker.failures,
            )
            self._set(worker, False)
            if self._on_eject is not None:
                self._on_eject(worker)

    def note_success(self, worker: Worker) -> None:
        if worker.failures or worker.ejections:
            worker.failures = worker.ejections = 0

    def replace(self, desired: Iterable[Worker]) -> list[Worker]:
        """Make the set `desired` (a worker is its model, URL and id): new workers join (unhealthy
        until checked: the caller checks them), missing ones drain, and a kept one takes the new
        region, router and health_path in place (a region change reaches the next usage event). A
        worker that comes back while it still drains is taken back as it is. Returns the new ones."""
        current = {(w.model, w.url, w.id): w for w in self.workers}
        want: dict[tuple[str, str, str], Worker] = {}
        for w in desired:
            want.setdefault((w.model, w.url, w.id), w)
        added = []
        for k, w in want.items():
            have = current.get(k)
            if have is None:
                added.append(w)
                continue
            if have.draining:
                have.draining = False
                log.info("worker %s (%s) is back: no longer draining", have.id, have.url)
            have.region, have.router, have.health_path = w.region, w.router, w.health_path
        for k, w in current.items():
            if k not in want and not w.draining:
                w.draining = True
                log.info("worker %s (%s) removed: draining %d request(s)", w.id, w.url, w.inflight)
        for w in added:
            self.workers.append(w)
            self._by_model.setdefault(w.model, []).append(w)
            log.info("worker %s (%s) added for %s", w.id, w.url, w.model)
        self.sweep()
        return added

    def sweep(self) -> None:
        """Drop drained workers (removed, nothing left in flight)."""
        gone = [w for w in self.workers if w.draining and w.inflight <= 0]
        if not gone:
            return
        self.workers = [w for w in self.workers if w not in gone]
        for model, ws in list(self._by_model.items()):
            self._by_model[model] = [w for w in ws if w not in gone]
        live = {(w.id, w.model) for w in self.workers}
        for w in gone:
            log.info("worker %s (%s) drained and removed", w.id, w.url)
            if self._on_gone is not None and (w.id, w.model) not in live:  # its series are not another's
                self._on_gone(w)

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
        if worker.ejected_until > time.monotonic():
            return  # ejected: not back before its time is up
        try:
            async with self._session.get(
                worker.url + worker.health_path, timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                self._set(worker, resp.status == 200)
        except (TimeoutError, aiohttp.ClientError, OSError):
            self._set(worker, False)
            return
        alone = len(self._by_model.get(worker.model, ())) < 2
        if worker.router or (self.routing == "least_loaded" and alone):
            return  # a router's /metrics is not an engine's; one worker: nothing to choose between
        try:
            async with self._session.get(
                worker.url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                if resp.status == 200:
                    page = await resp.read()
                    worker.queued, worker.kv_usage = routing.vllm_queue(page), routing.vllm_kv_usage(page)
        except (TimeoutError, aiohttp.ClientError, OSError):
            worker.queued, worker.kv_usage = 0, 0.0  # no metrics (not vLLM): the gateway's count decides

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.sweep()
            await self.check_all()
