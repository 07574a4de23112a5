"""The ledger on PostgreSQL with several writers: events/s with 1, 2 and 4 writer processes, and
afterwards the proof that nothing was lost or doubled and the hash chain verifies.

    .venv/bin/python -m bench.ledger_writers [--seconds 5] [--writers 1,2,4] [--out bench/results]

Each writer is a separate OS process with its own engine and `Ledger` (group commit, as a gateway
replica runs it) and 64 concurrent producers appending events one after another; all writers share
one PostgreSQL 15 database (Debian's, started on loopback by tests/pg.py, fsync on). Two workloads:
one tenant (every event on one tenant chain) and 200 tenants. Afterwards, from the database alone:
rows == events acknowledged by the writers (lost 0), distinct request ids == rows (doubled 0), each
tenant's `tenant_seq` is 1..n without a gap, and `verify_chain` walks the whole chain without a break.

What limits it is printed with the figures: every commit takes one transaction-scoped advisory lock
(metering/store_sql.py `_PG_LOCK_CHAIN`) because each event's hash chains to the one before it, so
commits are serialized across all writers; group commit amortizes that lock over the events that
queued while the previous commit ran. Results: bench/results/ledger-writers.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text

from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.ledger import Ledger, Spool
from metering.schema import usage_events
from metering.store_sql import UsageStore
from metering.verify import verify_chain
from serving import db_schema

PRODUCERS = 64


@dataclass
class Cell:
    writers: int
    tenants: int
    seconds: float
    acknowledged: int
    events_per_s: float
    per_writer: list[int]
    mean_batch: float
    p50_ms: float
    p99_ms: float
    rows: int
    lost: int
    doubled: int
    tenant_gaps: int
    chain_ok: bool


def _event(tenants: int) -> UsageEvent:
    now = datetime.now(UTC)
    return UsageEvent(
        request_id="req_" + uuid.uuid4().hex,
        tenant_id="bench" if tenants == 1 else f"t{random.randrange(tenants):03d}",
        key_id="key_bench",
        model="smollm2-135m-instruct",
        origin_country="KZ",
        prompt_tokens=57,
        cached_prompt_tokens=0,
        completion_tokens=24,
        stream=True,
        outcome=Outcome.OK,
        started_at=now,
        finished_at=now,
        language="ru",
        serving_region="cn-tianjin-1",
        worker_id="local-0",
    )


def _spooled(folder: Path) -> int:
    """Events the database did not take (written to the spool instead)."""
    return sum(len(f.read_bytes().splitlines()) for f in folder.iterdir() if f.is_file())


async def _write(url: str, seconds: float, tenants: int, start_at: float) -> dict[str, Any]:
    engine = make_engine(url)
    batches: list[int] = []
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as spool_dir:
        ledger = Ledger(
            UsageStore(engine),
            Spool(Path(spool_dir) / "spool.jsonl"),
            on_commit=lambda _s, n: batches.append(n),
        )
        await ledger.start()
        await asyncio.sleep(max(0.0, start_at - time.time()))  # every writer starts together
        deadline = time.perf_counter() + seconds

        async def producer() -> None:
            while time.perf_counter() < deadline:
                e = _event(tenants)
                t = time.perf_counter()
                await ledger.append(e)
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
        await ledger.close()
        spooled = await asyncio.to_thread(_spooled, Path(spool_dir))
    engine.dispose()
    latencies.sort()
    return {
        "acknowledged": len(latencies),
        "batches": batches,
        "p50": latencies[len(latencies) // 2] if latencies else 0.0,
        "p99": latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        "spooled": spooled,
    }


def _writer_main(url: str, seconds: float, tenants: int, start_at: float, out: Any) -> None:
    out.put(asyncio.run(_write(url, seconds, tenants, start_at)))


def _check(url: str) -> tuple[int, int, int, bool]:
    """(rows, doubled, tenant gaps, chain ok) from the database alone."""
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = int(conn.execute(select(func.count()).select_from(usage_events)).scalar() or 0)
        distinct = int(
            conn.execute(select(func.count(func.distinct(usage_events.c.request_id)))).scalar() or 0
        )
        per_tenant = conn.execute(
            select(
                usage_events.c.tenant_id,
                func.count(),
                func.min(usage_events.c.tenant_seq),
                func.max(usage_events.c.tenant_seq),
                func.count(func.distinct(usage_events.c.tenant_seq)),
            ).group_by(usage_events.c.tenant_id)
        ).all()
    gaps = sum(1 for _t, n, lo, hi, d in per_tenant if not (lo == 1 and hi == n == d))
    report = verify_chain(UsageStore(engine).iter_events())
    engine.dispose()
    return rows, rows - distinct, gaps, report.ok


def _fresh_db(server_url: str, name: str) -> str:
    admin = create_engine(server_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = server_url.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(url)
    db_schema.upgrade(engine)
    engine.dispose()
    return url


def cell(server_url: str, writers: int, tenants: int, seconds: float, n: int) -> Cell:
    url = _fresh_db(server_url, f"writers_{n}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # the processes import and connect first
    procs = [
        ctx.Process(target=_writer_main, args=(url, seconds, tenants, start_at, out)) for _ in range(writers)
    ]
    for p in procs:
        p.start()
    got = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    acknowledged = sum(g["acknowledged"] for g in got)
    batches = [b for g in got for b in g["batches"]]
    rows, doubled, gaps, chain_ok = _check(url)
    assert all(g["spooled"] == 0 for g in got), "a writer spooled events: the database refused a commit"
    return Cell(
        writers=writers,
        tenants=tenants,
        seconds=seconds,
        acknowledged=acknowledged,
        events_per_s=round(acknowledged / seconds, 1),
        per_writer=[g["acknowledged"] for g in got],
        mean_batch=round(sum(batches) / len(batches), 1) if batches else 0.0,
        p50_ms=round(max(g["p50"] for g in got) * 1000, 2),
        p99_ms=round(max(g["p99"] for g in got) * 1000, 2),
        rows=rows,
        lost=acknowledged - rows if rows <= acknowledged else 0,
        doubled=doubled + max(0, rows - acknowledged),
        tenant_gaps=gaps,
        chain_ok=chain_ok,
    )


def write(cells: list[Cell], out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    one = {c.tenants: c.events_per_s for c in cells if c.writers == 1}
    lines = [
        "# Ledger on PostgreSQL with 1, 2 and 4 writer processes",
        "",
        f"{stamp}, {os.cpu_count()} CPUs (the writers, PostgreSQL and this script share them), "
        f"{seconds:g} s per cell, {PRODUCERS} concurrent producers per writer. "
        "`python -m bench.ledger_writers`.",
        "",
        "| writers | tenants | events/s | vs 1 writer | per writer | events per commit | p50 ms | p99 ms "
        "| rows | lost | doubled | tenant seq gaps | chain |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        ratio = c.events_per_s / one[c.tenants] if one.get(c.tenants) else 0
        lines.append(
            f"| {c.writers} | {c.tenants} | {c.events_per_s:,.0f} | {ratio:.2f}x | "
            f"{', '.join(f'{n:,}' for n in c.per_writer)} | {c.mean_batch} | {c.p50_ms} | {c.p99_ms} | "
            f"{c.rows:,} | {c.lost} | {c.doubled} | {c.tenant_gaps} | "
            f"{'verifies' if c.chain_ok else 'BROKEN'} |"
        )
    lines += [
        "",
        "Every commit holds one transaction-scoped advisory lock (one chain, each hash over the one",
        "before), so writers take turns; group commit puts what queued meanwhile into the next",
        "transaction. The ceiling is one commit at a time: events/s ≈ events per commit ÷ commit time.",
        "Past it, the design is one chain per writer (its own advisory lock and head, a `chain_id`",
        "column), each writer's head anchored periodically into a shared root row, so a tenant's",
        "events verify along their writer's chain and the root proves the set of chains; not built.",
    ]
    (out / "ledger-writers.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "ledger-writers.json").write_text(
        json.dumps({"date": stamp, "seconds": seconds, "cells": [asdict(c) for c in cells]}, indent=2) + "\n",
        encoding="utf-8",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--writers", default="1,2,4")
    ap.add_argument("--tenants", default="1,200")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args()
    from tests import pg

    if not pg.available():
        raise SystemExit("PostgreSQL is not installed: run `make system-deps`")
    server = pg.PgServer(fsync=True).start()
    cells: list[Cell] = []
    try:
        n = 0
        for tenants in (int(x) for x in a.tenants.split(",")):
            for writers in (int(x) for x in a.writers.split(",")):
                c = cell(server.url, writers, tenants, a.seconds, n)
                n += 1
                cells.append(c)
                print(json.dumps(asdict(c)), flush=True)
    finally:
        server.close()
    write(cells, a.out, a.seconds)
    bad = [c for c in cells if c.lost or c.doubled or c.tenant_gaps or not c.chain_ok]
    if bad:
        raise SystemExit(f"ledger faults: {bad}")


if __name__ == "__main__":
    main()
