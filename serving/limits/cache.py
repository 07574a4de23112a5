"""Every gateway process keeps all limit policies in memory and reloads them when the registry
version moves (checked every `gateway.key_cache_refresh_s`), so a changed limit or budget applies
everywhere within that interval, without a database read on the request path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from serving.limits.policy import LimitPolicy
from serving.limits.store import LimitsStore
from serving.poller import Poller

log = logging.getLogger("tokenport.limits")


class PolicyCache:
    def __init__(self, store: LimitsStore, version: Callable[[], int], refresh_s: float) -> None:
        self._store = store
        self._version_of = version
        self._version = -1
        self._tenants: dict[str, LimitPolicy] = {}
        self._keys: dict[str, LimitPolicy] = {}
        self._poller = Poller("limit policy refresh", refresh_s, self.refresh, log)

    async def start(self) -> None:
        await self.refresh()
        self._poller.start()

    async def close(self) -> None:
        await self._poller.close()

    async def refresh(self, force: bool = False) -> None:
        version = await asyncio.to_thread(self._version_of)
        if force or version != self._version:
            self._tenants, self._keys = await asyncio.to_thread(self._store.all)
            self._version = version

    def tenant(self, tenant_id: str) -> LimitPolicy | None:
        return self._tenants.get(tenant_id)

    def key(self, key_id: str) -> LimitPolicy | None:
        return self._keys.get(key_id)
