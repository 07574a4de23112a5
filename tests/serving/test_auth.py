"""API keys at the gateway: the KeyRing on its own, and revocation/expiry against a running gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from unittest import mock

import openai
import pytest

from metering.db import make_engine
from metering.tenants import TenantStore, hash_key, utcnow
from serving import db_schema
from serving.auth import KeyRing
from serving.errors import AuthenticationFailed
from tests.conftest import MODEL, Gateway, TenantKey
from tests.fakes import FakeWorker

SECRET = "unit-test-secret-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TenantStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'auth.db'}")
    db_schema.upgrade(engine)
    yield TenantStore(engine, SECRET)
    engine.dispose()


@pytest.fixture
async def keyring(store: TenantStore) -> AsyncIterator[KeyRing]:
    ring = KeyRing(store, SECRET, refresh_s=0.05)
    await ring.start()
    yield ring
    await ring.close()


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "Token abc"])
async def test_missing_or_malformed_authorization(keyring: KeyRing, header: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        await keyring.authenticate(header)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


async def test_key_lifecycle_in_the_keyring(store: TenantStore, keyring: KeyRing) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    key, plain = store.create_key("acme")
    # A key created a moment ago works before the cache refreshes.
    p = await keyring.authenticate(f"Bearer {plain}")
    assert (p.tenant.id, p.key_id) == ("acme", key.id)
    assert (await keyring.authenticate(f"bearer   {plain}  ")).key_id == key.id  # scheme is case-insensitive
    with pytest.raises(AuthenticationFailed):
        await keyring.authenticate(f"Bearer {plain}x")
    store.revoke_key(key.id)
    await asyncio.sleep(0.2)  # a few refresh intervals
    with pytest.raises(AuthenticationFailed, match="revoked or has expired"):
        await keyring.authenticate(f"Bearer {plain}")
    # ... and stays refused (it is not re-cached by the database lookup).
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            await keyring.authenticate(f"Bearer {plain}")


async def test_revoking_a_key_takes_effect_within_half_a_second(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert done.choices  # the key is in the gateway's cache now
    await asyncio.to_thread(gateway.tenants.revoke_key, tenant.key.id)
    revoked_at = time.monotonic()
    while True:
        try:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        except openai.AuthenticationError as exc:
            assert exc.status_code == 401
            break
        assert time.monotonic() - revoked_at < 0.5, "a revoked key still worked after 0.5 s"
        await asyncio.sleep(0.02)
    assert time.monotonic() - revoked_at < 0.5
    n_ok = len(gateway.events_for(tenant.tenant.id))
    for _ in range(3):  # and it stays refused
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert len(gateway.events_for(tenant.tenant.id)) == n_ok


async def test_revoking_one_key_leaves_the_tenants_other_keys(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    _other, other_plain = gateway.tenants.create_key(tenant.tenant.id)
    gateway.tenants.revoke_key(tenant.key.id)
    await asyncio.sleep(0.5)
    with pytest.raises(openai.AuthenticationError):
        await gateway.client(tenant.api_key).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    done = await gateway.client(other_plain).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert done.choices


async def test_expired_keys_are_refused(gateway: Gateway, worker: FakeWorker) -> None:
    t, _k, _p = gateway.new_tenant()
    _old, old_plain = gateway.tenants.create_key(t.id, expires_at=utcnow() - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError, match="revoked or has expired"):
        await gateway.client(old_plain).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]

    expires = utcnow() + timedelta(seconds=3)  # long enough for the first call on a loaded machine
    _soon, soon_plain = gateway.tenants.create_key(t.id, expires_at=expires)
    client = gateway.client(soon_plain)
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert done.choices
    await asyncio.sleep(max(0.0, (expires - utcnow()).total_seconds()) + 0.1)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert len(gateway.events_for(t.id)) == 1


async def test_restricting_a_tenants_models_takes_effect_within_half_a_second(
    gateway: Gateway, tenant: TenantKey, client: openai.AsyncOpenAI, worker: FakeWorker
) -> None:
    assert (await client.chat.completions.create(model=MODEL, messages=MESSAGES)).choices  # type: ignore[arg-type]
    await asyncio.to_thread(gateway.tenants.set_allowed_models, tenant.tenant.id, ["tiny-other"])
    changed_at = time.monotonic()
    while True:
        try:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        except openai.NotFoundError:
            break
        assert time.monotonic() - changed_at < 0.5, "a withdrawn model still served after 0.5 s"
        await asyncio.sleep(0.02)
    assert [m.id for m in (await client.models.list()).data] == ["tiny-other"]
    assert (await client.chat.completions.create(model="tiny-other", messages=MESSAGES)).choices  # type: ignore[arg-type]


async def test_a_known_key_is_hashed_once(store: TenantStore, keyring: KeyRing) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    key, plain = store.create_key("acme")
    with mock.patch("serving.auth.hash_key", wraps=hash_key) as hashed:
        for _ in range(5):
            assert (await keyring.authenticate(f"Bearer {plain}")).key_id == key.id
        assert hashed.call_count == 1
        store.revoke_key(key.id)
        await asyncio.sleep(0.2)  # a few refresh intervals: the remembered digest does not keep it alive
        for _ in range(2):
            with pytest.raises(AuthenticationFailed, match="revoked or has expired"):
                await keyring.authenticate(f"Bearer {plain}")
    assert plain not in keyring._digests


async def test_tokens_that_fail_are_not_remembered(store: TenantStore, keyring: KeyRing) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    for i in range(50):
        with pytest.raises(AuthenticationFailed):
            await keyring.authenticate(f"Bearer tp_0123456789ab_{i:043d}")
        with pytest.raises(AuthenticationFailed):
            await keyring.authenticate(f"Bearer random-{i}")
    assert keyring._digests == {}


async def test_remembered_digests_are_capped(
    store: TenantStore, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.auth.DIGEST_CACHE_SIZE", 3)
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    keys = [store.create_key("acme") for _ in range(7)]
    for _ in range(2):
        for key, plain in keys:
            assert (await keyring.authenticate(f"Bearer {plain}")).key_id == key.id
            assert 1 <= len(keyring._digests) <= 3


class CountingStore:
    """A registry with no keys that counts database reads and how many run at once."""

    def __init__(self) -> None:
        self.lookups = 0
        self.running = 0
        self.most_at_once = 0
        self.registry_version = 1

    def lookup(self, _digest: str) -> None:
        self.lookups += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.005)
        self.running -= 1

    def version(self) -> int:
        return self.registry_version

    def active_keys(self) -> dict[str, object]:
        return {}

    def list_tenants(self) -> list[object]:
        return []


def _unknown_key(i: int) -> str:
    return f"tp_{i:012x}_" + "a" * 43


async def test_an_unknown_key_costs_one_database_read_until_the_registry_changes() -> None:
    store = CountingStore()
    ring = KeyRing(store, SECRET, refresh_s=60)  # type: ignore[arg-type]
    await ring.refresh()
    for _ in range(50):
        with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
            await ring.authenticate("Bearer " + _unknown_key(1))
    assert store.lookups == 1
    store.registry_version += 1  # a key was created or revoked somewhere: ask again
    await ring.refresh()
    with pytest.raises(AuthenticationFailed):
        await ring.authenticate("Bearer " + _unknown_key(1))
    assert store.lookups == 2


async def test_a_flood_of_distinct_unknown_keys_reads_the_database_one_at_a_time() -> None:
    store = CountingStore()
    ring = KeyRing(store, SECRET, refresh_s=60)  # type: ignore[arg-type]
    await ring.refresh()
    results = await asyncio.gather(
        *(ring.authenticate("Bearer " + _unknown_key(i)) for i in range(40)), return_exceptions=True
    )
    assert all(isinstance(r, AuthenticationFailed) for r in results)
    assert store.most_at_once == 1 and store.lookups == 40


async def test_the_negative_cache_is_bounded() -> None:
    store = CountingStore()
    ring = KeyRing(store, SECRET, refresh_s=60)  # type: ignore[arg-type]
    with mock.patch("serving.auth.NEGATIVE_CACHE_SIZE", 5):
        for i in range(20):
            with pytest.raises(AuthenticationFailed):
                await ring.authenticate("Bearer " + _unknown_key(i))
        assert len(ring._misses) == 5  # the bound itself is what is tested
        with pytest.raises(AuthenticationFailed):
            await ring.authenticate("Bearer " + _unknown_key(19))  # still remembered
    assert store.lookups == 20


async def test_a_key_created_after_a_negative_answer_works_within_the_refresh_interval(
    store: TenantStore, keyring: KeyRing
) -> None:
    store.create_tenant(id="acme", name="Acme", billing_country="DE")
    plain = "tp_0123456789ab_" + "b" * 43
    with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
        await keyring.authenticate(f"Bearer {plain}")  # now remembered as unknown
    with (
        mock.patch("metering.tenants.secrets.token_hex", return_value="0123456789ab"),
        mock.patch("metering.tenants.secrets.token_urlsafe", return_value="b" * 43),
    ):
        key, created = store.create_key("acme")
    assert created == plain
    await asyncio.sleep(0.05 * 3)  # key_cache_refresh_s is 0.05 here
    assert (await keyring.authenticate(f"Bearer {plain}")).key_id == key.id
    store.revoke_key(key.id)
    await asyncio.sleep(0.05 * 3)
    for _ in range(3):  # a revoked key keeps its own message, from the negative cache
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await keyring.authenticate(f"Bearer {plain}")
