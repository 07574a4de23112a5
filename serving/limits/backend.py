"""The admission algorithm, on state: token buckets (rate limits) and budget holds (reservations).

A request asks for several buckets and holds at once; it is admitted only if every one of them
admits it, and then all are charged together (atomically: in-process there is no await between the
check and the charge; in Redis the same steps run as one Lua script, see redis_backend.py).

Bucket (requests or tokens per minute): capacity C refilled continuously at C per 60 s, like
OpenAI's limits. `remaining` is what is left now and `reset` the time until the bucket is full again.
A token-bucket charge is the request's worst case; when the request ends, the unused part is given
back (or the overshoot taken). A bucket the state does not hold starts full, or, when its spec says
`seed=None` (the limiter's shared buckets, see limiter.py), the state answers `need_rate_seed` and the
bucket is then created once at capacity - seed (what the ledger says was used in the last minute).

Hold (budget): state `used` (settled usage in the budget's window), `reserved` (holds of requests in
flight) and one hold per request id with an expiry. Admit iff used + reserved + amount <= limit.
Settle: drop the hold and add the actual usage to `used`; release: drop the hold only. A hold that
outlives its expiry (a gateway process died mid-request) is dropped at the next admission, so no
budget stays blocked (a late settle of it still counts, once). Settling is idempotent: usage is added
only while the request's hold exists (or just expired), so a retried settle never counts twice.
`used` is seeded from the ledger the first time a window is touched; the seed
gets an epoch, and a settle only adds to `used` if the epoch it was admitted under still holds (after
a state loss the new seed already contains what the ledger has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class BucketSpec:
    key: str
    capacity: int  # per minute
    cost: int
    kind: Literal["requests", "tokens"]
    scope: Literal["tenant", "key"]
    # A bucket the state does not hold: created with capacity - seed; None asks for one (need_rate_seed)
    seed: int | None = 0


@dataclass(frozen=True, slots=True)
class HoldSpec:
    key: str
    limit: int
    amount: int
    ttl_ms: int  # how long the hold lives if never settled
    seed: int | None  # usage in the window from the ledger, given when the state asked for it
    key_ttl_ms: int  # how long the window's state is kept in Redis
    scope: Literal["tenant", "key"]


@dataclass(frozen=True, slots=True)
class BucketView:
    capacity: int
    remaining: int
    reset_ms: int
    kind: Literal["requests", "tokens"]
    scope: Literal["tenant", "key"]


@dataclass(slots=True)
class AdmitResult:
    status: Literal["ok", "need_seed", "need_rate_seed", "budget", "rate"]
    index: int = -1  # which bucket or hold refused (or needs a seed)
    buckets: list[BucketView] = field(default_factory=list)
    used: int = 0  # budget refusal: the hold's state
    reserved: int = 0
    retry_after_ms: int | None = None  # rate refusal; None = the request can never fit
    epochs: list[str] = field(default_factory=list)  # ok: per hold, the epoch admitted under


@dataclass(frozen=True, slots=True)
class HoldSettle:
    key: str
    actual: int | None  # None: release (the request produced nothing)
    epoch: str


@dataclass(frozen=True, slots=True)
class BucketRefund:
    key: str
    capacity: int
    refund: int  # > 0 gives back unused tokens, < 0 takes an overshoot


@dataclass(frozen=True, slots=True)
class HoldStatus:
    used: int
    reserved: int
    seeded: bool
    holds: int


class Backend(Protocol):
    async def admit(
        self, rid: str, now_ms: int, buckets: list[BucketSpec], holds: list[HoldSpec], new_epoch: str
    ) -> AdmitResult: ...

    async def settle(
        self, rid: str, now_ms: int, holds: list[HoldSettle], refunds: list[BucketRefund]
    ) -> None: ...

    async def status(self, key: str, now_ms: int) -> HoldStatus: ...

    async def heartbeat(self, member: str, ttl_ms: int) -> int:
        """Mark this process alive for ttl_ms; the number of processes alive (this one included)."""
        ...

    async def leave(self, member: str) -> None: ...

    async def close(self) -> None: ...


def refill(level: float, ts: int, capacity: int, now_ms: int) -> float:
    return min(float(capacity), level + max(0, now_ms - ts) * capacity / MINUTE_MS)


def view(spec: BucketSpec, level: float) -> BucketView:
    reset = math.ceil(max(0.0, spec.capacity - level) * MINUTE_MS / spec.capacity) if spec.capacity else 0
    return BucketView(spec.capacity, max(0, math.floor(level)), reset, spec.kind, spec.scope)


GONE_MS = 3_600_000  # expired holds are remembered this long, so a late settle counts once


@dataclass(slots=True)
class _Hold:
    used: int
    epoch: str
    reserved: int = 0
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # rid -> (amount, expires_ms)
    gone: dict[str, int] = field(default_factory=dict)  # expired rid -> when

    def purge(self, now_ms: int) -> None:
        for rid in [r for r, (_a, exp) in self.holds.items() if exp <= now_ms]:
            self.reserved -= self.holds.pop(rid)[0]
            self.gone[rid] = now_ms
        self.reserved = max(0, self.reserved)
        for rid in [r for r, t in self.gone.items() if t < now_ms - GONE_MS]:
            del self.gone[rid]


class MemoryBackend:
    """One gateway process: plain dicts, atomic because nothing awaits between check and charge."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, int]] = {}
        self._holds: dict[str, _Hold] = {}

    async def admit(
        self, rid: str, now_ms: int, buckets: list[BucketSpec], holds: list[HoldSpec], new_epoch: str
    ) -> AdmitResult:
        states: list[_Hold] = []
        for i, h in enumerate(holds):
            st = self._holds.get(h.key)
            if st is None:
                if h.seed is None:
                    return AdmitResult("need_seed", i)
                st = self._holds[h.key] = _Hold(used=h.seed, epoch=new_epoch)
            st.purge(now_ms)
            if st.used + st.reserved + h.amount > h.limit:
                return AdmitResult("budget", i, used=st.used, reserved=st.reserved)
            states.append(st)
        levels = []
        for b in buckets:
            # a new bucket starts at capacity - seed (the limiter's fallback: its share of the level
            # Redis last showed); seed None (shared buckets asking for one) starts full here
            level, ts = self._buckets.get(b.key, (float(max(0, b.capacity - (b.seed or 0))), now_ms))
            levels.append(refill(level, ts, b.capacity, now_ms))
        for i, b in enumerate(buckets):
            if b.cost > levels[i]:
                retry = (
                    math.ceil((b.cost - levels[i]) * MINUTE_MS / b.capacity) if b.cost <= b.capacity else None
                )
                return AdmitResult(
                    "rate",
                    i,
                    [view(s, lv) for s, lv in zip(buckets, levels, strict=True)],
                    retry_after_ms=retry,
                )
        views = []
        for b, level in zip(buckets, levels, strict=True):
            self._buckets[b.key] = (level - b.cost, now_ms)
            views.append(view(b, level - b.cost))
        for h, st in zip(holds, states, strict=True):
            st.reserved += h.amount
            st.holds[rid] = (h.amount, now_ms + h.ttl_ms)
        return AdmitResult("ok", buckets=views, epochs=[st.epoch for st in states])

    async def settle(
        self, rid: str, now_ms: int, holds: list[HoldSettle], refunds: list[BucketRefund]
    ) -> None:
        self.settle_now(rid, now_ms, holds, refunds)

    def settle_now(self, rid: str, now_ms: int, holds: list[HoldSettle], refunds: list[BucketRefund]) -> None:
        """settle() without awaiting (in-process state): the limiter's hot path calls it directly."""
        for s in holds:
            st = self._holds.get(s.key)
            if st is None:
                continue
            held = st.holds.pop(rid, None)
            if held is not None:
                st.reserved = max(0, st.reserved - held[0])
            counts = held is not None or st.gone.pop(rid, None) is not None  # never twice
            if counts and s.actual is not None and (not s.epoch or s.epoch == st.epoch):
                st.used += s.actual
        for r in refunds:
            if r.key in self._buckets and r.refund:
                level, ts = self._buckets[r.key]
                self._buckets[r.key] = (
                    min(float(r.capacity), refill(level, ts, r.capacity, now_ms) + r.refund),
                    now_ms,
                )

    async def status(self, key: str, now_ms: int) -> HoldStatus:
        st = self._holds.get(key)
        if st is None:
            return HoldStatus(0, 0, False, 0)
        st.purge(now_ms)
        return HoldStatus(st.used, st.reserved, True, len(st.holds))

    async def heartbeat(self, member: str, ttl_ms: int) -> int:
        return 1  # one process: its own state

    async def leave(self, member: str) -> None:
        return None

    def forget_idle(self, now_ms: int) -> None:
        """Drop buckets that are full again (nothing to remember)."""
        for key in [k for k, (_lv, ts) in self._buckets.items() if now_ms - ts > MINUTE_MS]:
            del self._buckets[key]

    async def close(self) -> None:
        return None
