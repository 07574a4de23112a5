"""TenantStore: ISO validation, keys stored only as an HMAC, revoke, lookup and expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from metering.clock import utcnow
from metering.tenants import (
    InvalidTenantField,
    KeyNotFound,
    RegistryError,
    TenantExists,
    TenantNotFound,
    TenantStore,
    hash_key,
)

SECRET = "tenant-test-secret-0123456789abcdef"


@pytest.fixture
def store(engine: Engine) -> TenantStore:
    return TenantStore(engine, SECRET)


def test_create_tenant_normalises_and_reads_back(store: TenantStore) -> None:
    t = store.create_tenant(
        id="acme-gmbh",
        name="  Acme GmbH ",
        billing_country="de",
        currency="eur",
        tax_id="DE123456789",
        language="de",
        allowed_models=["m1", "m2"],
        business=True,
    )
    assert (t.id, t.name, t.billing_country, t.currency) == ("acme-gmbh", "Acme GmbH", "DE", "EUR")
    assert t.allowed_models == ("m1", "m2") and t.may_use("m1") and not t.may_use("m3")
    assert t.created_at.tzinfo is not None
    assert store.get_tenant("acme-gmbh") == t
    assert store.get_tenant("nobody") is None
    open_ = store.create_tenant(id="open", name="Open", billing_country="SA")
    assert open_.allowed_models is None and open_.may_use("anything") and open_.currency == "USD"
    assert [x.id for x in store.list_tenants()] == ["acme-gmbh", "open"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"billing_country": "XX"}, "ISO 3166-1"),
        ({"billing_country": "DEU"}, "ISO 3166-1"),
        ({"billing_country": "UK"}, "ISO 3166-1"),  # the ISO code is GB
        ({"billing_country": ""}, "ISO 3166-1"),
        ({"currency": "EURO"}, "ISO 4217"),
        ({"currency": "XYZ"}, "ISO 4217"),
        ({"currency": "€"}, "ISO 4217"),
        ({"id": "Acme"}, "tenant id"),
        ({"id": "-acme"}, "tenant id"),
        ({"id": "acme corp"}, "tenant id"),
        ({"id": ""}, "tenant id"),
        ({"id": "a" * 65}, "tenant id"),
        ({"name": "   "}, "name"),
    ],
)
def test_iso_and_id_validation(store: TenantStore, kwargs: dict[str, str], match: str) -> None:
    args = {"id": "acme", "name": "Acme", "billing_country": "DE", "currency": "EUR", **kwargs}
    with pytest.raises(InvalidTenantField, match=match):
        store.create_tenant(**args)  # type: ignore[arg-type]
    assert store.list_tenants() == []


def test_duplicate_tenant_is_refused(store: TenantStore) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    with pytest.raises(TenantExists, match="already exists"):
        store.create_tenant(id="acme", name="Other", billing_country="FR")


def test_key_is_stored_only_as_hmac(store: TenantStore, engine: Engine, db_url: str) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    key, plaintext = store.create_key("acme", name="ci")
    assert plaintext.startswith("tp_" + key.id[4:] + "_") and len(plaintext) > 40
    assert key.prefix == plaintext[:15] and key.prefix.startswith("tp_")
    secret_part = plaintext.split("_", 2)[2]
    assert len(secret_part) >= 40
    digest = hash_key(SECRET, plaintext)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT hash FROM api_keys WHERE id = :i"), {"i": key.id}).scalar()
    assert stored == digest
    assert digest != hash_key("another-secret", plaintext)  # keyed: useless without the server secret
    engine.dispose()  # everything on disk (main file and WAL) is what we inspect
    db_path = Path(db_url.removeprefix("sqlite:///"))
    blob = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    assert digest.encode() in blob  # the check can see what is stored ...
    assert plaintext.encode() not in blob  # ... and the key itself is not there
    assert secret_part.encode() not in blob
    assert store.get_key(key.id) == key


def test_lookup_by_hash(store: TenantStore) -> None:
    t = store.create_tenant(id="acme", name="Acme", billing_country="DE")
    key, plain = store.create_key("acme")
    found = store.lookup(hash_key(SECRET, plain))
    assert found == (key, t)
    assert store.lookup(hash_key(SECRET, plain + "x")) is None
    assert store.lookup(hash_key("wrong-secret", plain)) is None
    with pytest.raises(TenantNotFound, match="does not exist"):
        store.create_key("nobody")
    with pytest.raises(TenantNotFound):
        store.set_allowed_models("nobody", None)


def test_revoke(store: TenantStore) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    key, plain = store.create_key("acme")
    other, other_plain = store.create_key("acme")
    v = store.version()
    revoked = store.revoke_key(key.id)
    assert revoked.revoked_at is not None and not revoked.active(utcnow())
    assert store.version() > v  # every gateway notices
    v = store.version()
    assert store.revoke_key(key.id).revoked_at == revoked.revoked_at  # idempotent
    assert store.version() == v
    found = store.lookup(hash_key(SECRET, plain))
    assert found is not None and not found[0].active(utcnow())  # lookup still finds it, inactive
    active = store.active_keys()
    assert set(active) == {hash_key(SECRET, other_plain)}
    assert active[hash_key(SECRET, other_plain)][0] == other
    with pytest.raises(KeyNotFound, match="does not exist"):
        store.revoke_key("key_nope")
    assert [k.id for k in store.list_keys("acme")] == [key.id, other.id]


def test_expiry(store: TenantStore) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    now = utcnow()
    past, _ = store.create_key("acme", expires_at=now - timedelta(minutes=1))
    future, _ = store.create_key("acme", expires_at=now + timedelta(hours=1))
    forever, _ = store.create_key("acme")
    assert not past.active(now)
    assert future.active(now) and not future.active(now + timedelta(hours=2))
    assert forever.active(now + timedelta(days=3650))
    assert future.expires_at is not None
    assert abs(future.expires_at - (now + timedelta(hours=1))) < timedelta(milliseconds=1)
    # a non-UTC expiry means the same instant
    local = datetime(2030, 1, 1, 16, 0, tzinfo=timezone(timedelta(hours=8)))
    k, _ = store.create_key("acme", expires_at=local)
    assert k.expires_at == datetime(2030, 1, 1, 8, 0, tzinfo=UTC)


def test_version_moves_on_every_change(store: TenantStore) -> None:
    assert store.version() == 0
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    v1 = store.version()
    key, _ = store.create_key("acme")
    v2 = store.version()
    store.revoke_key(key.id)
    assert 0 < v1 < v2 < store.version()


def test_registry_errors_map_to_http_codes_by_type_not_message() -> None:
    from serving.api_errors import registry_error

    assert registry_error(TenantNotFound("x")).status_code == 404
    assert registry_error(KeyNotFound("key_1")).status_code == 404
    assert registry_error(TenantExists("x")).status_code == 409
    assert registry_error(InvalidTenantField("currency 'ZZZ' is not an ISO 4217 code")).status_code == 400
    # a message that merely reads like another error does not change the code
    assert registry_error(RegistryError("the tenant does not exist, already exists")).status_code == 400
