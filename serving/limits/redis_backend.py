"""The admission algorithm of backend.py as Lua scripts in Redis, shared by every gateway process.

Each script runs atomically in Redis, so concurrent admissions from any number of processes see one
order. All keys of a request carry the tenant as hash tag (`tp:{tenant}:...`), so they live in one
slot and the scripts also work on Redis Cluster. Keys:
  tp:{T}:rl:<scope>:<rpm|tpm>        bucket: level, ts                  (expires after an idle day)
  tp:{T}:bg:<scope>:<window>:<unit>  hold state: used, reserved, epoch  (kept for the window + margin)
  ...:r  (hash rid -> amount)   ...:x  (zset rid -> expiry ms)          the holds in flight
  ...:g  (zset rid -> when it expired)                                  expired holds, for an hour
  tp:live:{gateways}                 zset process id -> last heartbeat (the live gateway processes)

A bucket is kept for a day after its last request, so a missing bucket is new or was lost (Redis
restarted empty): the limiter asks for it with seed=None, ADMIT answers need_rate_seed, and the
next ADMIT creates it at capacity - seed and writes it at once, so of several processes that seeded
concurrently only the first one's seed counts (never subtracted twice).
"""

from __future__ import annotations

from typing import Any

from serving.limits.backend import (
    AdmitResult,
    BucketRefund,
    BucketSpec,
    BucketView,
    HoldSettle,
    HoldSpec,
    HoldStatus,
)

BUCKET_TTL_MS = 86_400_000  # a bucket outlives a day without requests: a missing one means new or lost
LIVE_KEY = "tp:live:{gateways}"  # zset process id -> last heartbeat (Redis's clock); one slot

# Shared Lua: drop a window's expired holds (their amounts leave `reserved`, their ids move to the
# "gone" set for an hour, so a late settle still counts its usage exactly once).
PURGE = r"""
local function purge(kst, kres, kexp, kgone, now, reserved)
  local expired = redis.call('ZRANGEBYSCORE', kexp, '-inf', now)
  if #expired == 0 then return reserved end
  for _, r in ipairs(expired) do
    local amt = redis.call('HGET', kres, r)
    if amt then
      reserved = reserved - tonumber(amt)
      redis.call('HDEL', kres, r)
      redis.call('ZADD', kgone, now, r)
    end
    redis.call('ZREM', kexp, r)
  end
  redis.call('ZREMRANGEBYSCORE', kgone, '-inf', now - 3600000)
  if reserved < 0 then reserved = 0 end
  redis.call('HSET', kst, 'reserved', string.format('%d', reserved))
  return reserved
end
"""

ADMIT = (
    PURGE
    + f"local BUCKET_TTL = {BUCKET_TTL_MS}\n"
    + r"""
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local nb = tonumber(ARGV[3])
local nh = tonumber(ARGV[4])
local new_epoch = ARGV[5]
local a = 6
local epochs = {}
for i = 1, nh do
  local k = nb + (i - 1) * 4
  local kst, kres, kexp, kgone = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local o = a + nb * 3 + (i - 1) * 5
  local limit, amount, seed = tonumber(ARGV[o]), tonumber(ARGV[o + 1]), tonumber(ARGV[o + 3])
  local st = redis.call('HMGET', kst, 'used', 'reserved', 'epoch')
  if not st[3] then
    if seed < 0 then return {'need_seed', i - 1} end
    redis.call('DEL', kres, kexp, kgone)
    redis.call('HSET', kst, 'used', ARGV[o + 3], 'reserved', 0, 'epoch', new_epoch)
    redis.call('PEXPIRE', kst, tonumber(ARGV[o + 4]))
    st = {seed, 0, new_epoch}
  end
  local used = tonumber(st[1])
  local reserved = purge(kst, kres, kexp, kgone, now, tonumber(st[2]))
  if used + reserved + amount > limit then return {'budget', i - 1, used, reserved} end
  epochs[i] = st[3]
end
local levels = {}
for i = 1, nb do
  local cap, seed = tonumber(ARGV[a + (i - 1) * 3]), tonumber(ARGV[a + (i - 1) * 3 + 2])
  local st = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = cap
  if st[1] then
    level = math.min(cap, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * cap / 60000)
  elseif seed < 0 then
    return {'need_rate_seed', i - 1}
  else
    -- created (from the ledger's last minute when asked for): written now, so only the first seed counts
    level = math.max(0, cap - seed)
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', now)
    redis.call('PEXPIRE', KEYS[i], BUCKET_TTL)
  end
  levels[i] = level
end
for i = 1, nb do
  local cap, cost = tonumber(ARGV[a + (i - 1) * 3]), tonumber(ARGV[a + (i - 1) * 3 + 1])
  if cost > levels[i] then
    local retry = -1
    if cost <= cap then retry = math.ceil((cost - levels[i]) * 60000 / cap) end
    local views = {'rate', i - 1, retry}
    for j = 1, nb do table.insert(views, tostring(levels[j])) end
    return views
  end
end
local out = {'ok', -1, -1}
for i = 1, nb do
  local level = levels[i] - tonumber(ARGV[a + (i - 1) * 3 + 1])
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], BUCKET_TTL)
  table.insert(out, tostring(level))
end
for i = 1, nh do
  local k = nb + (i - 1) * 4
  local o = a + nb * 3 + (i - 1) * 5
  local ttl, keyttl = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 4])
  -- held once per request id: a replayed admission (retried after its reply was lost) holds nothing more
  if redis.call('HSETNX', KEYS[k + 2], rid, ARGV[o + 1]) == 1 then
    redis.call('HINCRBY', KEYS[k + 1], 'reserved', ARGV[o + 1])
  end
  redis.call('ZADD', KEYS[k + 3], now + ttl, rid)
  for j = 1, 4 do redis.call('PEXPIRE', KEYS[k + j], keyttl) end
  table.insert(out, epochs[i])
end
return out
"""
)

# Settle (actual >= 0) or release (actual = -1) one request's holds. Idempotent: usage is added only
# when the request's hold is found in flight or among the recently expired, and the hold is consumed,
# so a retried settle (a timeout after Redis did run it) never counts twice.
SETTLE = r"""
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local nh = tonumber(ARGV[3])
local nb = tonumber(ARGV[4])
local a = 5
for i = 1, nh do
  local k = (i - 1) * 4
  local kst, kres, kexp, kgone = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local actual, epoch = tonumber(ARGV[a + (i - 1) * 2]), ARGV[a + (i - 1) * 2 + 1]
  local held = false
  local amt = redis.call('HGET', kres, rid)
  if amt then
    held = true
    redis.call('HDEL', kres, rid)
    redis.call('ZREM', kexp, rid)
    local left = redis.call('HINCRBY', kst, 'reserved', string.format('%d', -tonumber(amt)))
    if left < 0 then redis.call('HSET', kst, 'reserved', 0) end
  elseif redis.call('ZREM', kgone, rid) == 1 then
    held = true
  end
  if held and actual >= 0 then
    local cur = redis.call('HGET', kst, 'epoch')
    if cur and (epoch == '' or cur == epoch) then
      redis.call('HINCRBY', kst, 'used', ARGV[a + (i - 1) * 2])
    end
  end
end
local b = a + nh * 2
for i = 1, nb do
  local key = KEYS[nh * 4 + i]
  local cap, refund = tonumber(ARGV[b + (i - 1) * 2]), tonumber(ARGV[b + (i - 1) * 2 + 1])
  local st = redis.call('HMGET', key, 'level', 'ts')
  if st[1] then
    local level = math.min(cap, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * cap / 60000)
    level = math.min(cap, level + refund)
    redis.call('HSET', key, 'level', tostring(level), 'ts', now)
  end
end
return 1
"""

STATUS = (
    PURGE
    + r"""
local st = redis.call('HMGET', KEYS[1], 'used', 'reserved', 'epoch')
if not st[3] then return {0, 0, 0, 0} end
local reserved = purge(KEYS[1], KEYS[2], KEYS[3], KEYS[4], tonumber(ARGV[1]), tonumber(st[2]))
return {tonumber(st[1]), reserved, 1, redis.call('HLEN', KEYS[2])}
"""
)


# One process's heartbeat: mark it alive, forget those silent for ttl, count the rest. Redis's own clock,
# so the gateways' clocks need not agree.
HEARTBEAT = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""


def _hold_keys(key: str) -> list[str]:
    return [key, key + ":r", key + ":x", key + ":g"]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBackend:
    def __init__(self, url: str, *, timeout_s: float = 0.5, max_connections: int = 64) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        # A blocking pool: a burst of admissions waits briefly for a connection instead of failing.
        # A command that fails with a connection error is sent once more on a new connection: after a
        # Redis restart every pooled connection is dead, and without this each one failed one request
        # (503) the first time it was used, long after Redis was back (bench/fleet.py: 48 clients 47 s
        # later). A replayed ADMIT holds nothing twice (HSETNX); SETTLE is idempotent; timeouts are not
        # retried (a slow Redis may have run the script: the limiter drops its hold instead).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s * 4,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._pool = pool
        self.client = aioredis.Redis(connection_pool=pool)
        self._admit = self.client.register_script(ADMIT)
        self._settle = self.client.register_script(SETTLE)
        self._status = self.client.register_script(STATUS)
        self._heartbeat = self.client.register_script(HEARTBEAT)

    async def admit(
        self, rid: str, now_ms: int, buckets: list[BucketSpec], holds: list[HoldSpec], new_epoch: str
    ) -> AdmitResult:
        keys: list[str] = [b.key for b in buckets]
        argv: list[Any] = [now_ms, rid, len(buckets), len(holds), new_epoch]
        for b in buckets:
            argv += [b.capacity, b.cost, -1 if b.seed is None else b.seed]
        for h in holds:
            keys += _hold_keys(h.key)
            argv += [h.limit, h.amount, h.ttl_ms, -1 if h.seed is None else h.seed, h.key_ttl_ms]
        raw = await self._admit(keys=keys, args=argv)
        status, index = _s(raw[0]), int(raw[1])
        if status in ("need_seed", "need_rate_seed"):
            return AdmitResult(status, index)  # type: ignore[arg-type]
        if status == "budget":
            return AdmitResult("budget", index, used=int(raw[2]), reserved=int(raw[3]))
        levels = [float(_s(v)) for v in raw[3 : 3 + len(buckets)]]
        views = [_view(b, lv) for b, lv in zip(buckets, levels, strict=True)]
        if status == "rate":
            retry = int(raw[2])
            return AdmitResult("rate", index, views, retry_after_ms=None if retry < 0 else retry)
        return AdmitResult("ok", buckets=views, epochs=[_s(e) for e in raw[3 + len(buckets) :]])

    async def settle(
        self, rid: str, now_ms: int, holds: list[HoldSettle], refunds: list[BucketRefund]
    ) -> None:
        keys: list[str] = []
        argv: list[Any] = [now_ms, rid, len(holds), len(refunds)]
        for h in holds:
            keys += _hold_keys(h.key)
            argv += [-1 if h.actual is None else h.actual, h.epoch]
        for r in refunds:
            keys.append(r.key)
            argv += [r.capacity, r.refund]
        await self._settle(keys=keys, args=argv)

    async def status(self, key: str, now_ms: int) -> HoldStatus:
        raw = await self._status(keys=_hold_keys(key), args=[now_ms])
        return HoldStatus(int(raw[0]), int(raw[1]), bool(int(raw[2])), int(raw[3]))

    async def heartbeat(self, member: str, ttl_ms: int) -> int:
        return int(await self._heartbeat(keys=[LIVE_KEY], args=[member, ttl_ms]))

    async def leave(self, member: str) -> None:
        await self.client.zrem(LIVE_KEY, member)

    async def close(self) -> None:
        await self.client.aclose()
        await self._pool.disconnect()


def _view(spec: BucketSpec, level: float) -> BucketView:
    from serving.limits.backend import view

    return view(spec, level)
