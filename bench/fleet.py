"""Three gateway replicas on one PostgreSQL and one Redis, under faults (issue 14, "Measured here").

    .venv/bin/python -m bench.fleet [--seconds 20] [--clients 64] [--out bench/results]

Started here, for real: PostgreSQL 15 (tests/pg.py, fsync on), Redis 7 (tests/redis_fixture.py), a
fake vLLM worker that streams 20 tokens in about 0.4 s (bench/slow_upstream.py) and three `tokenport
gateway` processes on three ports, all on `limits.backend: redis` and the one PostgreSQL ledger.
`--clients` concurrent streaming clients spread round-robin over the replicas, half for a tenant with
a small token budget, half for a tenant with a rate limit (RPM). Scenarios, each on fresh tenants:

- `steady`: no fault;
- `kill -9`: one replica SIGKILLed a third of the way in, restarted at two thirds;
- `redis restart`: Redis stopped a third of the way in for 10 s (its counters are gone: a fresh
  Redis), then started;
- `postgres restart`: PostgreSQL stopped a third of the way in for 30 s, then started.

Measured per scenario, from what the clients saw and from the database afterwards:

- completed: streams that ended with `data: [DONE]`; refused: 429 (budget or rate); errors: other
  statuses and broken connections, by kind;
- lost: completed streams whose request id is not in the ledger (after the spools are replayed);
- doubled: request ids in the ledger more than once (the unique key makes it 0 by construction);
- budget overrun: the budget tenant's ledger tokens past its budget;
- rate: requests the RPM tenant was served vs its limit over the run's minutes;
- chain: `verify_chain` over the whole ledger.

Streams cut by a killed replica are counted apart ("cut by the kill"): the process that relayed them
is gone, so whether they were billed depends on how far they got (README: Reliability).
Results: bench/results/fleet.md and fleet.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from metering.db import make_engine
from metering.schema import usage_events
from metering.store_sql import UsageStore
from metering.verify import verify_chain

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
MODEL = "smollm2-135m-instruct"
BUDGET_TOKENS = 20_000
RPM = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class Outcome:
    completed: list[str] = field(default_factory=list)
    refused: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cut_by_kill: list[str] = field(default_factory=list)


@dataclass
class Result:
    scenario: str
    seconds: float
    completed: int
    refused_429: int
    errors: dict[str, int]
    cut_by_kill: int
    cut_billed: int
    lost: int
    doubled: int
    budget_tokens: int
    budget_billed: int
    budget_overrun: int
    rpm_limit: int
    rpm_served: int
    rpm_allowed: int
    events: int
    chain_ok: bool


class Fleet:
    def __init__(self, tmp: Path, db_url: str, redis_url: str, worker: str) -> None:
        self.tmp, self.db_url, self.redis_url, self.worker = tmp, db_url, redis_url, worker
        self.ports = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None, None]

    def env(self, i: int) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TOKENPORT_CONFIG": str(REPO / "configs" / "tokenport.yaml"),
            "TOKENPORT_DATA_DIR": str(self.tmp / f"gw{i}"),
            "TOKENPORT_DATABASE_URL": self.db_url,
            "TOKENPORT_LIMITS__BACKEND": "redis",
            "TOKENPORT_LIMITS__REDIS_URL": self.redis_url,
            "TOKENPORT_GATEWAY__METRICS_PORT": "0",
        }

    def cli(self, *args: str) -> Any:
        out = subprocess.run(
            [str(BIN / "tokenport"), *args], env=self.env(0), capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0:
            raise RuntimeError(f"tokenport {' '.join(args)}: {out.stdout}{out.stderr}")
        return json.loads(out.stdout) if "--json" in args else out.stdout

    def start(self, i: int) -> None:
        (self.tmp / f"gw{i}").mkdir(parents=True, exist_ok=True)
        log = open(self.tmp / f"gw{i}" / "gateway.log", "ab")  # noqa: SIM115 - the child's
        self.procs[i] = subprocess.Popen(
            [
                str(BIN / "tokenport"),
                "gateway",
                "--port",
                str(self.ports[i]),
                "--worker",
                f"{MODEL}={self.worker}",
            ],
            env=self.env(i),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_http(f"http://127.0.0.1:{self.ports[i]}/healthz")

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            self.procs[i] = None

    def stop_all(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                self.procs[i] = None

    def tenant(self, tid: str, *limits: str) -> str:
        self.cli("tenants", "create", "--id", tid, "--name", tid, "--billing-country", "KZ", "--json")
        if limits:
            self.cli("tenants", "set-limits", tid, *limits)
        return str(self.cli("keys", "create", "--tenant", tid, "--json")["key"])


async def client(fleet: Fleet, key: str, n: int, until: float, out: Outcome, killed: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about Astana."}],
        "max_tokens": 20,
        "stream": True,
    }
    i = n
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=2)) as c:
        while time.monotonic() < until:
            i += 1
            replica = i % 3
            url = f"http://127.0.0.1:{fleet.ports[replica]}/v1/chat/completions"
            rid = None
            try:
                async with c.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                    rid = r.headers.get("x-request-id")
                    if r.status_code == 429:
                        out.refused += 1
                        await r.aread()
                        await asyncio.sleep(0.2)
                        continue
                    if r.status_code != 200:
                        out.errors[f"http {r.status_code}"] += 1
                        await r.aread()
                        await asyncio.sleep(0.2)
                        continue
                    done = False
                    async for line in r.aiter_lines():
                        if line.strip() == "data: [DONE]":
                            done = True
                    if done and rid:
                        out.completed.append(rid)
                    else:
                        out.errors["stream ended without [DONE]"] += 1
            except httpx.HTTPError as exc:
                if killed.get("replica") == replica and rid:
                    out.cut_by_kill.append(rid)
                out.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.2)


async def load(
    fleet: Fleet, keys: list[str], clients: int, seconds: float, fault: Any
) -> tuple[Outcome, Outcome]:
    outs = (Outcome(), Outcome())
    until = time.monotonic() + seconds
    killed: dict[str, Any] = {}
    tasks = [
        asyncio.create_task(client(fleet, keys[n % 2], n, until, outs[n % 2], killed)) for n in range(clients)
    ]
    if fault is not None:
        await fault(seconds, killed)
    await asyncio.gather(*tasks)
    return outs


def ledger_of(db_url: str, tenants: list[str]) -> tuple[dict[str, int], dict[str, int], int, int, bool]:
    """(request id -> count, tenant -> tokens, events, doubled, chain ok)."""
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ids = Counter(
            str(r)
            for r in conn.execute(
                select(usage_events.c.request_id).where(usage_events.c.tenant_id.in_(tenants))
            ).scalars()
        )
        tokens = {
            str(t): int(n or 0)
            for t, n in conn.execute(
                select(
                    usage_events.c.tenant_id,
                    func.sum(usage_events.c.prompt_tokens + usage_events.c.completion_tokens),
                )
                .where(usage_events.c.tenant_id.in_(tenants))
                .group_by(usage_events.c.tenant_id)
            ).all()
        }
    report = verify_chain(UsageStore(engine).iter_events())
    events = sum(ids.values())
    engine.dispose()
    return dict(ids), tokens, events, sum(n - 1 for n in ids.values() if n > 1), report.ok


async def scenario(name: str, fleet: Fleet, clients: int, seconds: float, fault: Any, n: int) -> Result:
    budget_t, rate_t = f"budget-{n}", f"rate-{n}"
    keys = [
        fleet.tenant(budget_t, "--budget", str(BUDGET_TOKENS), "--budget-unit", "tokens"),
        fleet.tenant(rate_t, "--rpm", str(RPM)),
    ]
    await asyncio.sleep(1.5)  # keys and limits reach every replica (key cache refresh)
    t0 = time.monotonic()
    budget_out, rate_out = await load(fleet, keys, clients, seconds, fault)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(6)  # spooled events replayed (every 2 s once the database is back)
    ids, tokens, events, doubled, chain_ok = ledger_of(fleet.db_url, [budget_t, rate_t])
    completed = budget_out.completed + rate_out.completed
    cut = budget_out.cut_by_kill + rate_out.cut_by_kill
    rate_served = sum(1 for r in rate_out.completed if r in ids) + sum(
        1 for r in rate_out.cut_by_kill if r in ids
    )
    return Result(
        scenario=name,
        seconds=round(elapsed, 1),
        completed=len(completed),
        refused_429=budget_out.refused + rate_out.refused,
        errors=dict(budget_out.errors + rate_out.errors),
        cut_by_kill=len(cut),
        cut_billed=sum(1 for r in cut if r in ids),
        lost=sum(1 for r in completed if r not in ids),
        doubled=doubled,
        budget_tokens=BUDGET_TOKENS,
        budget_billed=tokens.get(budget_t, 0),
        budget_overrun=max(0, tokens.get(budget_t, 0) - BUDGET_TOKENS),
        rpm_limit=RPM,
        rpm_served=rate_served,
        rpm_allowed=int(RPM + RPM * elapsed / 60),  # a full bucket, plus what refills during the run
        events=events,
        chain_ok=chain_ok,
    )


def write(results: list[Result], out: Path, clients: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        "# Three gateway replicas on PostgreSQL + Redis, under faults",
        "",
        f"{stamp}, {os.cpu_count()} CPUs shared by everything (3 gateways, PostgreSQL, Redis, the fake "
        f"worker, {clients} clients). `python -m bench.fleet`. Budget tenant: {BUDGET_TOKENS:,} tokens a "
        f"month; rate tenant: {RPM} requests a minute; each request 31 prompt + 20 completion tokens.",
        "",
        "| scenario | s | completed | 429 | errors seen by clients | cut by the kill (billed) | lost "
        "| doubled | budget billed / limit | overrun | RPM tenant served / allowed | chain |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"
        lines.append(
            f"| {r.scenario} | {r.seconds} | {r.completed:,} | {r.refused_429:,} | {errors} | "
            f"{r.cut_by_kill} ({r.cut_billed}) | {r.lost} | {r.doubled} | {r.budget_billed:,} / "
            f"{r.budget_tokens:,} | {r.budget_overrun} | {r.rpm_served} / {r.rpm_allowed} | "
            f"{'verifies' if r.chain_ok else 'BROKEN'} |"
        )
    (out / "fleet.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "fleet.json").write_text(
        json.dumps({"date": stamp, "clients": clients, "results": [asdict(r) for r in results]}, indent=2)
        + "\n",
        encoding="utf-8",
    )


async def run_all(a: argparse.Namespace, fleet: Fleet, server: Any, redis: Any) -> list[Result]:
    async def kill(seconds: float, killed: dict[str, Any]) -> None:
        await asyncio.sleep(seconds / 3)
        killed["replica"] = 1
        fleet.kill(1)
        await asyncio.sleep(seconds / 3)
        await asyncio.to_thread(fleet.start, 1)

    async def redis_restart(seconds: float, _killed: dict[str, Any]) -> None:
        await asyncio.sleep(seconds / 3)
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(10)
        await asyncio.to_thread(redis.start)

    async def pg_restart(seconds: float, _killed: dict[str, Any]) -> None:
        await asyncio.sleep(seconds / 3)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(30)
        await asyncio.to_thread(server.start)

    plan = [
        ("steady", a.seconds, None),
        ("kill -9 one replica", a.seconds, kill),
        ("redis restart (10 s down)", max(a.seconds, 20), redis_restart),
        ("postgres restart (30 s down)", max(a.seconds, 45), pg_restart),
    ]
    results: list[Result] = []
    for n, (name, seconds, fault) in enumerate(plan):
        r = await scenario(name, fleet, a.clients, seconds, fault, n)
        results.append(r)
        print(json.dumps(asdict(r)), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args()
    from tests import pg
    from tests.redis_fixture import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="tokenport-fleet-"))
    (tmp / "redis").mkdir()
    server = pg.PgServer(fsync=True).start()
    redis = RedisServer(free_port(), tmp / "redis").start()
    upstream_port = free_port()
    args = ["--port", str(upstream_port), "--interval", "0.02", "--chunks", "20"]
    upstream = subprocess.Popen([sys.executable, "-m", "bench.slow_upstream", *args], cwd=REPO)
    worker = f"http://127.0.0.1:{upstream_port}"
    fleet = Fleet(tmp, server.url, redis.url, worker)
    try:
        wait_http(worker + "/health")
        fleet.cli("db", "upgrade")
        for i in range(3):
            fleet.start(i)
        results = asyncio.run(run_all(a, fleet, server, redis))
    finally:
        fleet.stop_all()
        upstream.terminate()
        redis.stop()
        server.close()
    write(results, a.out, a.clients)


if __name__ == "__main__":
    main()
