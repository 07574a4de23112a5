"""Credentials: an API key -> Principal(tenant, key id) (`KeyRing`); the admin token -> Admin (`AdminAuth`).

Every gateway process keeps the active keys (by HMAC) in memory and reloads them when the registry
version in the database moves (checked every `key_cache_refresh_s`, 0.25 s by default), so a key
revoked by the CLI or another process stops working within that interval. A key not in the cache is
looked up in the database before it is refused, so a key created a moment ago works at once.

A well-formed key that is not in the cache is looked up in the database once: the answer (unknown,
or revoked/expired) is remembered in a bounded negative cache (`NEGATIVE_CACHE_SIZE` digests, oldest
dropped first) until the registry version moves, so a flood of unknown keys costs no database read
per request; the reads that remain run one at a time. A key created after a negative answer moves
the registry version, which clears the negative cache at the next refresh: the key works within
`key_cache_refresh_s`.

The HMAC of a bearer token that authenticated is remembered (token -> digest, at most
`DIGEST_CACHE_SIZE` tokens, forgotten all at once when full), so a known key costs a dict lookup
instead of an HMAC. The digest -> key map stays the only authority: revocation and expiry work as
before. Tokens that fail never enter the cache, so random tokens can neither grow nor flush it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from dataclasses import dataclass

from metering.clock import utcnow
from metering.tenants import KEY_RE, ApiKey, Tenant, TenantStore, hash_key
from serving.audit import Who
from serving.errors import AuthenticationFailed
from serving.poller import Poller

log = logging.getLogger("tokenport.auth")
DIGEST_CACHE_SIZE = 10_000
NEGATIVE_CACHE_SIZE = 10_000
Found = tuple[ApiKey, Tenant]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: Tenant
    key_id: str


class KeyRing:
    def __init__(self, store: TenantStore, secret_key: str, refresh_s: float) -> None:
        self._store = store
        self._secret = secret_key
        self._keys: dict[str, tuple[ApiKey, Tenant]] = {}
        self._digests: dict[str, str] = {}  # bearer token -> hash_key(secret, token), for keys that worked
        self._tenants: dict[str, Tenant] = {}
        # digest -> None (no such key) or the inactive key, as the database answered at this registry version
        self._misses: OrderedDict[str, Found | None] = OrderedDict()
        self._lookups = asyncio.Lock()  # one database read at a time, whatever the flood
        self._version = -1
        self._poller = Poller("API key refresh", refresh_s, self.refresh, log)

    async def start(self) -> None:
        await self.refresh()
        self._poller.start()

    async def close(self) -> None:
        await self._poller.close()

    async def refresh(self) -> None:
        version = await asyncio.to_thread(self._store.version)
        if version != self._version:
            self._keys = await asyncio.to_thread(self._store.active_keys)
            self._tenants = {t.id: t for t in await asyncio.to_thread(self._store.list_tenants)}
            self._version = version
            self._misses.clear()  # a key created or revoked since: ask the database again

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("Malformed Authorization header: use 'Bearer KEY'.")
        digest = self._digests.get(token)
        remembered = digest is not None
        if digest is None:
            digest = hash_key(self._secret, token)
        found = self._keys.get(digest)
        if found is None and KEY_RE.fullmatch(token):  # only a well-formed key is worth a database read
            found = await self._lookup(digest)
        if found is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        key, tenant = found
        if not key.active(utcnow()):
            self._keys.pop(digest, None)
            self._digests.pop(token, None)
            raise AuthenticationFailed("This API key has been revoked or has expired.")
        if not remembered:
            if len(self._digests) >= DIGEST_CACHE_SIZE:
                self._digests.clear()
            self._digests[token] = digest
        return Principal(tenant=tenant, key_id=key.id)

    async def _lookup(self, digest: str) -> Found | None:
        """The key with this digest from the database, or the negative cache's answer."""
        if digest in self._misses:
            return self._misses[digest]
        async with self._lookups:
            if digest in self._misses:  # answered while this request waited
                return self._misses[digest]
            if digest in self._keys:
                return self._keys[digest]
            version = self._version
            found = await asyncio.to_thread(self._store.lookup, digest)
        if found is not None and found[0].active(utcnow()):
            self._keys[digest] = found
        elif version == self._version:  # no refresh since the read: the answer is current
            if len(self._misses) >= NEGATIVE_CACHE_SIZE:
                self._misses.popitem(last=False)
            self._misses[digest] = found
        return found


@dataclass(frozen=True, slots=True)
class Admin:
    """Who performed an admin action (for the audit log)."""

    actor: str
    client_ip: str | None

    def who(self) -> Who:
        return Who.api(self.actor, self.client_ip)


class AdminAuth:
    """The admin credential: a bearer token separate from tenant keys, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def check(self, authorization: str | None, client_ip: str | None) -> Admin:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise AuthenticationFailed(
                "Admin routes need 'Authorization: Bearer <admin token>'.", code="invalid_admin_token"
            )
        return Admin(actor="admin", client_ip=client_ip)
