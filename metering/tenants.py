"""Tenants (the customer organisations) and their API keys: types and the store (the only tenant SQL).

Keys are `tp_<key id>_<secret>`; only an HMAC-SHA256 of the whole key under the server secret is
stored. `tp_<key id>` is the visible prefix support staff can see.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pycountry
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from metering.clock import to_aware, to_naive, utcnow
from metering.schema import api_keys, registry_version, tenants

# Re-exported for the callers that still import the clock from here (they move to metering.clock).
__all__ = [
    "KEY_RE",
    "TENANT_ID_RE",
    "ApiKey",
    "InvalidTenantField",
    "KeyNotFound",
    "RegistryError",
    "Tenant",
    "TenantExists",
    "TenantNotFound",
    "TenantStore",
    "hash_key",
    "to_aware",
    "to_naive",
    "utcnow",
    "valid_country",
]

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
KEY_RE = re.compile(r"^tp_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")  # what create_key makes: tp_<key id>_<secret>
_COUNTRIES = frozenset(c.alpha_2 for c in pycountry.countries)
_CURRENCIES = frozenset(c.alpha_3 for c in pycountry.currencies)


class RegistryError(Exception):
    """A tenant or key request that cannot be done; the message says why. Callers map the subclasses
    by type (serving/api_errors.py): not found 404, exists 409, anything else 400."""


class TenantNotFound(RegistryError):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id!r} does not exist")
        self.tenant_id = tenant_id


class KeyNotFound(RegistryError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"key {key_id!r} does not exist")
        self.key_id = key_id


class TenantExists(RegistryError):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id!r} already exists")
        self.tenant_id = tenant_id


class InvalidTenantField(RegistryError):
    """A field of a tenant (id, country, currency, name) that is not valid."""


def valid_country(code: str) -> bool:
    return code in _COUNTRIES


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with name, billing_country and currency (those present) checked and normalized: the one
    check of create_tenant and update_tenant."""
    out = dict(fields)
    if "billing_country" in out:
        out["billing_country"] = str(out["billing_country"]).upper()
        if not valid_country(out["billing_country"]):
            raise InvalidTenantField(
                f"billing country {fields['billing_country']!r} is not an ISO 3166-1 alpha-2 code"
            )
    if "currency" in out:
        out["currency"] = str(out["currency"]).upper()
        if out["currency"] not in _CURRENCIES:
            raise InvalidTenantField(f"currency {fields['currency']!r} is not an ISO 4217 code")
    if "name" in out:
        if not str(out["name"]).strip():
            raise InvalidTenantField("tenant name must not be empty")
        out["name"] = str(out["name"]).strip()
    return out


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    billing_country: str
    business: bool
    tax_id: str | None
    currency: str
    language: str | None
    allowed_models: tuple[str, ...] | None
    created_at: datetime

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    tenant_id: str
    prefix: str
    name: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def hash_key(secret_key: str, api_key: str) -> str:
    return hmac.new(secret_key.encode(), api_key.encode(), hashlib.sha256).hexdigest()


class TenantStore:
    def __init__(self, engine: Engine, secret_key: str) -> None:
        self._engine = engine
        self._secret = secret_key

    # --- tenants -------------------------------------------------------------------------
    def create_tenant(
        self,
        *,
        id: str,
        name: str,
        billing_country: str,
        business: bool = True,
        tax_id: str | None = None,
        currency: str = "USD",
        language: str | None = None,
        allowed_models: list[str] | None = None,
    ) -> Tenant:
        if not TENANT_ID_RE.match(id):
            raise InvalidTenantField(f"tenant id {id!r} must be 1-64 of a-z, 0-9, '_' or '-', starting alnum")
        checked = _checked({"name": name, "billing_country": billing_country, "currency": currency})
        row = {
            "id": id,
            "name": checked["name"],
            "billing_country": checked["billing_country"],
            "business": business,
            "tax_id": tax_id,
            "currency": checked["currency"],
            "language": language,
            "allowed_models": json.dumps(allowed_models) if allowed_models is not None else None,
            "created_at": to_naive(utcnow()),
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(tenants).values(**row))
                self._bump(conn)
        except IntegrityError as exc:
            raise TenantExists(id) from exc
        tenant = self.get_tenant(id)
        assert tenant is not None
        return tenant

    def update_tenant(self, tenant_id: str, **changes: Any) -> Tenant:
        """Change a tenant's name, billing_country, business, tax_id, currency or language (the same
        checks as create_tenant). Issued invoices keep the buyer as it was (they snapshot it)."""
        allowed = {"name", "billing_country", "business", "tax_id", "currency", "language"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise InvalidTenantField(f"cannot change {', '.join(unknown)}")
        changes = _checked(changes)
        with self._engine.begin() as conn:
            done = conn.execute(update(tenants).where(tenants.c.id == tenant_id).values(**changes))
            if not done.rowcount:
                raise TenantNotFound(tenant_id)
            self._bump(conn)
        tenant = self.get_tenant(tenant_id)
        assert tenant is not None
        return tenant

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(tenants).where(tenants.c.id == tenant_id)).mappings().first()
        return None if row is None else _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(tenants).order_by(tenants.c.id)).mappings().all()
        return [_tenant(r) for r in rows]

    def set_allowed_models(self, tenant_id: str, models: list[str] | None) -> Tenant:
        """Restrict the tenant to these models (None: every catalogued model)."""
        with self._engine.begin() as conn:
            res = conn.execute(
                update(tenants)
                .where(tenants.c.id == tenant_id)
                .values(allowed_models=json.dumps(sorted(set(models))) if models is not None else None)
            )
            if not res.rowcount:
                raise TenantNotFound(tenant_id)
            self._bump(conn)
        tenant = self.get_tenant(tenant_id)
        assert tenant is not None
        return tenant

    # --- keys ----------------------------------------------------------------------------
    def create_key(
        self, tenant_id: str, *, name: str | None = None, expires_at: datetime | None = None
    ) -> tuple[ApiKey, str]:
        """Create a key; returns it with the plaintext, which is never stored and never shown again."""
        if self.get_tenant(tenant_id) is None:
            raise TenantNotFound(tenant_id)
        key_id = "key_" + secrets.token_hex(6)
        plaintext = f"tp_{key_id[4:]}_{secrets.token_urlsafe(32)}"
        row = {
            "id": key_id,
            "tenant_id": tenant_id,
            "prefix": plaintext[:15],
            "name": name,
            "hash": hash_key(self._secret, plaintext),
            "created_at": to_naive(utcnow()),
            "expires_at": to_naive(expires_at) if expires_at else None,
            "revoked_at": None,
        }
        with self._engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
            self._bump(conn)
        key = self.get_key(key_id)
        assert key is not None
        return key, plaintext

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
        return None if row is None else _key(row)

    def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        q = select(api_keys).order_by(api_keys.c.created_at)
        if tenant_id is not None:
            q = q.where(api_keys.c.tenant_id == tenant_id)
        with self._engine.connect() as conn:
            return [_key(r) for r in conn.execute(q).mappings().all()]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self._engine.begin() as conn:
            res = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=to_naive(utcnow()))
            )
            if res.rowcount:
                self._bump(conn)
        key = self.get_key(key_id)
        if key is None:
            raise KeyNotFound(key_id)
        return key

    def lookup(self, key_hash: str) -> tuple[ApiKey, Tenant] | None:
        """The key with this hash and its tenant, whether active or not."""
        q = select(api_keys, tenants.c.id.label("t_id")).join(tenants, tenants.c.id == api_keys.c.tenant_id)
        with self._engine.connect() as conn:
            row = conn.execute(q.where(api_keys.c.hash == key_hash)).mappings().first()
        if row is None:
            return None
        tenant = self.get_tenant(row["tenant_id"])
        assert tenant is not None
        return _key(row), tenant

    def active_keys(self) -> dict[str, tuple[ApiKey, Tenant]]:
        """Every unrevoked key by hash, with its tenant: what a gateway caches."""
        with self._engine.connect() as conn:
            trows = conn.execute(select(tenants)).mappings().all()
            krows = conn.execute(select(api_keys).where(api_keys.c.revoked_at.is_(None))).mappings().all()
        by_id = {r["id"]: _tenant(r) for r in trows}
        return {r["hash"]: (_key(r), by_id[r["tenant_id"]]) for r in krows}

    def version(self) -> int:
        with self._engine.connect() as conn:
            v = conn.execute(select(func.max(registry_version.c.version))).scalar()
        return int(v or 0)

    @staticmethod
    def _bump(conn: object) -> None:
        from sqlalchemy.engine import Connection

        assert isinstance(conn, Connection)
        res = conn.execute(
            update(registry_version)
            .where(registry_version.c.id == 1)
            .values(version=registry_version.c.version + 1)
        )
        if not res.rowcount:
            conn.execute(insert(registry_version).values(id=1, version=1))


def _tenant(row: object) -> Tenant:
    r = dict(row)  # type: ignore[call-overload]
    allowed = json.loads(r["allowed_models"]) if r["allowed_models"] else None
    created = to_aware(r["created_at"])
    assert created is not None
    return Tenant(
        id=r["id"],
        name=r["name"],
        billing_country=r["billing_country"],
        business=bool(r["business"]),
        tax_id=r["tax_id"],
        currency=r["currency"],
        language=r["language"],
        allowed_models=tuple(allowed) if allowed is not None else None,
        created_at=created,
    )


def _key(row: object) -> ApiKey:
    r = dict(row)  # type: ignore[call-overload]
    created = to_aware(r["created_at"])
    assert created is not None
    return ApiKey(
        id=r["id"],
        tenant_id=r["tenant_id"],
        prefix=r["prefix"],
        name=r["name"],
        created_at=created,
        expires_at=to_aware(r["expires_at"]),
        revoked_at=to_aware(r["revoked_at"]),
    )
