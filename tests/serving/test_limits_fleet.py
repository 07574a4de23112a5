"""Rate limits of a fleet sharing one Redis, when Redis goes away and when it comes back empty.

Two Limiters on one Redis are two gateway processes (each its own client, its own memory). The
ledger is a real SQLite UsageStore holding what the tenants used in the last minute.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from metering.db import make_engine
from metering.metrics import Metrics
from metering.store_sql import UsageStore
from metering.tenants import Tenant
from serving import db_schema
from serving.limits.backend import MemoryBackend
from serving.limits.errors import RateLimitExceeded
from serving.limits.limiter import Admission, Limiter
from serving.limits.policy import Defaults, LimitPolicy
from serving.limits.redis_backend import RedisBackend
from tests.metering.conftest import make_event
from tests.redis_fixture import RedisServer, _free_port


@dataclass
class Policies:
    """A PolicyCache stand-in: fixed policies per tenant and per key."""

    tenants: dict[str, LimitPolicy]
    keys: dict[str, LimitPolicy]

    def tenant(self, tenant_id: str) -> LimitPolicy | None:
        return self.tenants.get(tenant_id)

    def key(self, key_id: str) -> LimitPolicy | None:
        return self.keys.get(key_id)


class CountingUsage(UsageStore):
    """The real ledger, counting how often the limiter reads it."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.summaries = 0

    def summary(self, *a: Any, **kw: Any) -> list[dict[str, object]]:
        self.summaries += 1
        return super().summary(*a, **kw)


def tenant(tenant_id: str) -> Tenant:
    return Tenant(tenant_id, tenant_id, "DE", True, None, "USD", None, None, datetime.now(UTC))


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(_free_port(), tmp_path).start()  # its own: the tests stop and restart it
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def usage(tmp_path: Path) -> Iterator[CountingUsage]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    db_schema.upgrade(engine)
    yield CountingUsage(engine)
    engine.dispose()


@pytest.fixture
async def fleet(
    redis: RedisServer, usage: CountingUsage, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Limiter, Limiter]]:
    policies = Policies(*request.param) if hasattr(request, "param") else Policies({}, {})
    a, b = (
        Limiter(
            RedisBackend(redis.url, timeout_s=0.2),
            policies,  # type: ignore[arg-type]
            usage,
            Metrics([]),
            defaults=Defaults(),
            fallback=MemoryBackend(),
        )
        for _ in range(2)
    )
    try:
        yield a, b
    finally:
        for lim in (a, b):
            await lim.close()


async def admit(lim: Limiter, tenant_id: str, key_id: str, i: int, tokens: int = 1) -> Admission | None:
    try:
        return await lim.admit(
            tenant(tenant_id),
            key_id,
            f"{tenant_id}-{id(lim)}-{i}",
            "m",
            prompt_tokens=tokens,
            completion_tokens=0,
        )
    except RateLimitExceeded:
        return None


def used_in_the_last_minute(usage: UsageStore, tenant_id: str, key_id: str, n: int, tokens: int = 10) -> None:
    now = datetime.now(UTC)
    usage.append_batch(
        [
            make_event(
                tenant_id=tenant_id,
                key_id=key_id,
                prompt_tokens=tokens,
                cached_prompt_tokens=0,
                completion_tokens=0,
                started_at=now - timedelta(seconds=5),
            )
            for _ in range(n)
        ]
    )


RPM10: tuple[dict[str, LimitPolicy], dict[str, LimitPolicy]] = ({"t": LimitPolicy(rpm=10)}, {})


@pytest.mark.parametrize("fleet", [RPM10], indirect=True)
async def test_two_processes_admit_about_one_limit_together_while_redis_is_away(
    fleet: tuple[Limiter, Limiter], redis: RedisServer
) -> None:
    """Each process counted 2 live processes while Redis answered, so each takes half of the RPM
    while it is away: 10 admitted of 20, not 10 by each process (20)."""
    a, b = fleet
    await a.beat()
    assert await b.beat() == 2 and await a.beat() == 2
    redis.stop()
    admitted = [await admit((a, b)[i % 2], "t", "key_1", i) for i in range(20)]
    assert sum(x is not None for x in admitted) == 10
    assert [x is not None for x in admitted[:10]] == [True] * 10  # 5 each, then both refuse
    assert a.live == b.live == 2  # the count as Redis last answered
    assert a.metrics.registry.get_sample_value("tokenport_limits_live_processes") == 2


@pytest.mark.parametrize("fleet", [RPM10], indirect=True)
async def test_an_outage_does_not_give_a_spent_limit_back(
    fleet: tuple[Limiter, Limiter], redis: RedisServer
) -> None:
    """The whole RPM was used through Redis just before it went away: each process's share starts at
    its part of the level Redis last showed (empty, refilled since), not full, so the outage is not a
    second bucket (it was: 10 more admitted at once)."""
    a, b = fleet
    await a.beat()
    assert await b.beat() == 2 and await a.beat() == 2
    admitted = [await admit((a, b)[i % 2], "t", "key_1", i) for i in range(12)]
    assert sum(x is not None for x in admitted) == 10  # the bucket, shared through Redis
    redis.stop()
    after = [await admit((a, b)[i % 2], "t", "key_1", 100 + i) for i in range(10)]
    assert sum(x is not None for x in after) <= 1  # the refill of the last moments at most


@pytest.mark.parametrize("fleet", [RPM10], indirect=True)
async def test_started_processes_count_each_other_by_their_heartbeats(fleet: tuple[Limiter, Limiter]) -> None:
    a, b = fleet
    await a.start()
    await b.start()
    for _ in range(100):  # the first beat of `a` came before `b` existed; its next one sees both
        if a.live == b.live == 2:
            break
        await asyncio.sleep(0.1)
    assert a.live == b.live == 2


@pytest.mark.parametrize("fleet", [({"t": LimitPolicy(tpm=1000)}, {})], indirect=True)
async def test_a_request_larger_than_the_share_waits_instead_of_being_too_large(
    fleet: tuple[Limiter, Limiter], redis: RedisServer
) -> None:
    a, b = fleet
    await a.beat()
    await b.beat()
    assert await a.beat() == 2
    redis.stop()
    with pytest.raises(RateLimitExceeded) as info:
        await a.admit(tenant("t"), "key_1", "big", "m", prompt_tokens=800, completion_tokens=0)
    assert "try again" in str(info.value) and info.value.headers["retry-after"] == "60"
    assert await admit(a, "t", "key_1", 1, tokens=500) is not None  # the share is 500


@pytest.mark.parametrize("fleet", [RPM10], indirect=True)
async def test_a_process_that_leaves_is_no_longer_counted(fleet: tuple[Limiter, Limiter]) -> None:
    a, b = fleet
    await a.beat()
    assert await b.beat() == 2
    await b.close()
    assert await a.beat() == 1


@pytest.mark.parametrize(
    "fleet",
    [({"t": LimitPolicy(rpm=10), "u": LimitPolicy(rpm=10, tpm=1000)}, {})],
    indirect=True,
)
async def test_a_redis_restarted_empty_seeds_the_rate_buckets_from_the_ledger_once(
    fleet: tuple[Limiter, Limiter], redis: RedisServer, usage: CountingUsage
) -> None:
    """Redis comes back empty: the buckets start at limit - what the ledger says was used in the last
    minute, not full; both processes admit at once, and the seed is subtracted once, not twice."""
    a, b = fleet
    assert await admit(a, "t", "key_1", 0) is not None  # buckets exist in Redis
    used_in_the_last_minute(usage, "t", "key_1", 6)
    usage.append_batch([make_event(tenant_id="t", started_at=datetime.now(UTC) - timedelta(seconds=90))])
    used_in_the_last_minute(usage, "other", "key_9", 10)  # another tenant's usage does not count
    used_in_the_last_minute(usage, "u", "key_1", 10, tokens=90)  # u: its whole RPM, 900 of 1000 TPM
    redis.stop()
    redis.start()  # empty
    before = usage.summaries
    results = await asyncio.gather(*(admit((a, b)[i % 2], "t", "key_1", 100 + i) for i in range(10)))
    assert sum(r is not None for r in results) == 10 - 6  # seeded once: not 10 (full), not 0 (twice)
    assert usage.summaries - before < 10  # single flight per process: not a read per request
    assert await admit(a, "u", "key_1", 1) is None  # used its whole RPM a few seconds ago: refused
    assert await admit(b, "u", "key_1", 2) is None


@pytest.mark.parametrize(
    "fleet", [({"u": LimitPolicy(rpm=100, tpm=1000)}, {"key_2": LimitPolicy(rpm=3)})], indirect=True
)
async def test_seeds_count_tokens_for_tpm_and_a_keys_own_requests_for_its_buckets(
    fleet: tuple[Limiter, Limiter], redis: RedisServer, usage: CountingUsage
) -> None:
    a, _b = fleet
    used_in_the_last_minute(usage, "u", "key_1", 5, tokens=100)  # 500 tokens
    used_in_the_last_minute(usage, "u", "key_2", 2, tokens=100)  # 200 tokens; key_2: 2 of its 3 RPM
    assert await admit(a, "u", "key_1", 0, tokens=301) is None  # 1000 - 700 = 300 left
    assert await admit(a, "u", "key_2", 1, tokens=100) is not None  # key_2's third request
    assert await admit(a, "u", "key_2", 2, tokens=100) is None  # key_2's RPM is used up
    assert await admit(a, "u", "key_1", 3, tokens=200) is not None  # the tenant's last 200 tokens
    assert await admit(a, "u", "key_1", 4, tokens=5) is None
