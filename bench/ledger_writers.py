"""Ledger events/s on PostgreSQL with 1, 2 and 4 writer processes appending at once (issue 14).

    python -m bench.ledger_writers [--seconds 8] [--inflight 64] [--writers 1,2,4] [--out bench/results]

Each writer is a separate OS process with its own engine and its own `Ledger` (group commit, one
writer thread, max_batch 512), like one gateway replica: `--inflight` asyncio tasks each append one
event after another (bench/ledger_bench.py's event) for `--seconds`, all writers starting at the same
instant. Two tenancies: every event of one tenant, and each event of one of 1,000 tenants.
PostgreSQL 15 from Debian (tests/pg.py, fsync on), a fresh database per cell.

Measured per cell: events/s of all writers together, append latency (p50, p99: what a request
waits for its commit), events per commit, how many writers were waiting on a lock (sampled from
pg_stat_activity every 20 ms), and the CPU used by PostgreSQL and by the writers. Checked after
each cell: every appended request id is stored exactly once, nothing else is, the hash chain
verifies (metering/verify.py) and each tenant's positions (tenant_seq) run 1..n without a gap.
Results: bench/results/<date>-ledger-writers.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ledger_bench import _event
from bench.run import RESULTS, ROOT, VENV_BIN, core_busy, cpu_seconds, log, tree

MANY_TENANTS = 1000
TENANCIES = ("one", "many")


# --------------------------------------------------------------------------- one writer process

# What the append transaction sends, by the start of the statement (metering/store_sql.py).
STATEMENTS = (
    ("SET LOCAL lock_timeout", "set lock_timeout"),
    ("SELECT pg_advisory_xact_lock", "take the chain lock"),
    ("SELECT usage_events.request_id", "request ids already stored"),
    ("SELECT usage_events.hash", "chain head"),
    ("SELECT usage_events.tenant_id, max", "tenant heads (max tenant_seq)"),  # before 4201562
    ("SELECT t.tenant_id, (SELECT max", "tenant heads (max tenant_seq)"),
    ("INSERT INTO usage_events", "insert the rows"),
)


def _time_statements(engine: Any) -> dict[str, float]:
    """Seconds spent in each statement of the append transaction (the rest of a commit's time is the
    COMMIT itself, building the rows and hashing them)."""
    from sqlalchemy import event

    spent: dict[str, float] = {}
    started: dict[int, float] = {}

    def name(statement: str) -> str:
        return next((n for prefix, n in STATEMENTS if statement.startswith(prefix)), "other")

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, _cursor: Any, _statement: str, *_a: Any) -> None:
        started[id(conn)] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, _cursor: Any, statement: str, *_a: Any) -> None:
        k = name(statement)
        spent[k] = spent.get(k, 0.0) + time.perf_counter() - started.pop(id(conn), time.perf_counter())

    return spent


async def _write(url: str, seconds: float, inflight: int, tenants: int, start_at: float) -> dict[str, Any]:
    from metering.db import make_engine
    from metering.ledger import Ledger, Spool
    from metering.store_sql import UsageStore

    engine = make_engine(url)
    sql_s = _time_statements(engine)
    store = UsageStore(engine, append_wait_s=1.0)  # metering.spool_after_s, the gateway's default
    commits: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as spool_dir:
        ledger = Ledger(
            store, Spool(Path(spool_dir) / "spool.jsonl"), on_commit=lambda s, n: commits.append((s, n))
        )
        await ledger.start()
        await ledger.append(dataclasses.replace(_event(), tenant_id="warm-" + str(os.getpid())))
        commits.clear()
        sql_s.clear()
        rids: list[str] = []
        latencies: list[float] = []
        rng = random.Random(os.getpid())
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + seconds

        async def producer() -> None:
            while time.perf_counter() < deadline:
                tenant = "t0" if tenants == 1 else f"t{rng.randrange(tenants)}"
                e = dataclasses.replace(_event(), tenant_id=tenant)
                t = time.perf_counter()
                await ledger.append(e)
                latencies.append(time.perf_counter() - t)
                rids.append(e.request_id)

        t0 = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(inflight)))
        elapsed = time.perf_counter() - t0
        await ledger.close()  # replays the spool if anything went there (a lock wait over 1 s)
        spool_left = ledger.spool.pending()
    engine.dispose()
    return {
        "events": len(rids),
        "seconds": elapsed,
        "latencies_ms": sorted(round(x * 1000, 3) for x in latencies),
        "commits": len(commits),
        "commit_s": [round(s, 5) for s, _n in commits],
        "batch": [n for _s, n in commits],
        "rids": rids,
        "spool_left": spool_left,
        "sql_s": sql_s,
    }


# --------------------------------------------------------------------------- one cell


@dataclass
class Cell:
    writers: int
    tenancy: str
    events: int
    seconds: float
    events_per_s: float
    per_writer_events_per_s: list[float]
    commits_per_s: float
    mean_batch: float
    commit_ms_p50: float
    p50_ms: float
    p99_ms: float
    lock_waiters_mean: float
    lock_waiters_max: int
    pg_cpu_s: float
    writers_cpu_s: float
    machine_busy_pct: float
    stored: int
    distinct_request_ids: int
    missing: int
    unexpected: int
    chain_ok: bool
    tenant_seq_ok: bool
    per_commit_ms: dict[str, float] = dataclasses.field(default_factory=dict)


def _sample_locks(url: str, stop: threading.Event, samples: list[int]) -> None:
    from sqlalchemy import text

    from metering.db import make_engine

    engine = make_engine(url)
    q = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    with engine.connect() as conn:
        while not stop.wait(0.02):
            samples.append(int(conn.execute(q).scalar() or 0))
            conn.commit()
    engine.dispose()


def _check(url: str, appended: set[str]) -> dict[str, Any]:
    from sqlalchemy import text

    from metering.db import make_engine
    from metering.store_sql import UsageStore
    from metering.verify import verify_chain

    engine = make_engine(url)
    try:
        store = UsageStore(engine)
        report = verify_chain(store.iter_events())
        with engine.connect() as conn:
            stored = [
                str(r[0])
                for r in conn.execute(
                    text(
                        "SELECT request_id FROM usage_events "
                        "WHERE request_id LIKE 'req_%' AND tenant_id LIKE 't%'"
                    )
                )
            ]
            gaps = conn.execute(
                text(
                    "SELECT count(*) FROM (SELECT tenant_id, count(*) n, max(tenant_seq) m, "
                    "count(DISTINCT tenant_seq) d FROM usage_events GROUP BY tenant_id) x "
                    "WHERE n <> m OR n <> d"
                )
            ).scalar()
    finally:
        engine.dispose()
    stored_set = set(stored)
    return {
        "stored": len(stored),
        "distinct_request_ids": len(stored_set),
        "missing": len(appended - stored_set),
        "unexpected": len(stored_set - appended),
        "chain_ok": report.ok,
        "tenant_seq_ok": gaps == 0,
    }


PREFILL = 50_000


def store_sql_file() -> str:
    from metering import store_sql

    return store_sql.__file__ or "?"


def _prefill(engine: Any, tenants: int) -> None:
    """A ledger that is not empty (PREFILL events of the same tenants, ids `pre_...`), then ANALYZE:
    on a table never analyzed, PostgreSQL plans the request-id lookup as a sequential scan, and
    psycopg's prepared statement keeps that plan until the next (auto)analyze, which made every
    commit O(table) in a first try of this bench (19 ms per 64-id lookup at 9,600 rows)."""
    from sqlalchemy import text

    from metering.store_sql import UsageStore

    store = UsageStore(engine)
    rng = random.Random(0)
    for _ in range(PREFILL // 500):
        batch = [
            dataclasses.replace(
                _event(),
                request_id="pre_" + os.urandom(16).hex(),
                tenant_id="t0" if tenants == 1 else f"t{rng.randrange(tenants)}",
            )
            for _ in range(500)
        ]
        store.append_batch(batch)
    with engine.begin() as conn:
        conn.execute(text("ANALYZE usage_events"))


def run_cell(
    server: Any, db: str, writers: int, tenancy: str, seconds: float, inflight: int, work: Path
) -> Cell:
    from sqlalchemy import create_engine, text

    from metering.db import make_engine
    from serving import db_schema

    base = server.url.rsplit("/", 1)[0]
    admin = create_engine(base + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    admin.dispose()
    url = f"{base}/{db}"
    engine = make_engine(url)
    db_schema.upgrade(engine)
    tenants = 1 if tenancy == "one" else MANY_TENANTS
    _prefill(engine, tenants)
    engine.dispose()

    start_at = time.time() + 4.0  # every writer connected and warmed up by then
    # the writers run the same product code as this process (PYTHONPATH first: --code-style A/B runs)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    )
    outs = [work / f"{db}-w{i}.json" for i in range(writers)]
    procs = [
        subprocess.Popen(
            [
                str(VENV_BIN / "python"),
                "-m",
                "bench.ledger_writers",
                "writer",
                url,
                str(seconds),
                str(inflight),
                str(tenants),
                str(start_at),
                str(out),
            ],
            env=env,
            cwd=ROOT,
        )
        for out in outs
    ]
    time.sleep(max(0.0, start_at - time.time()))
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_locks, args=(url, stop, samples), daemon=True)
    cores = f"0-{(os.cpu_count() or 1) - 1}"
    w_cpu0 = sum(cpu_seconds(tree(p.pid)) for p in procs)
    busy0, t0 = core_busy(cores), time.monotonic()
    sampler.start()
    time.sleep(seconds)
    stop.set()
    w_cpu = sum(cpu_seconds(tree(p.pid)) for p in procs) - w_cpu0
    busy_s, wall_s = core_busy(cores) - busy0, time.monotonic() - t0
    busy = busy_s / (wall_s * (os.cpu_count() or 1))
    # PostgreSQL's backends and autovacuum workers come and go (an exited one takes its CPU time
    # with it), so its share is what the machine was busy with beyond the writers.
    pg_cpu = busy_s - w_cpu
    sampler.join(5)
    for p in procs:
        if p.wait(120) != 0:
            raise RuntimeError(f"writer {p.pid} exited with {p.returncode}")
    results = [json.loads(o.read_text()) for o in outs]
    appended: set[str] = set()
    for r in results:
        appended.update(r["rids"])
    lat = sorted(x for r in results for x in r["latencies_ms"])
    events = sum(r["events"] for r in results)
    wall = max(r["seconds"] for r in results)
    commits = sum(r["commits"] for r in results)
    commit_s = sorted(x for r in results for x in r["commit_s"])
    checked = _check(url, appended)
    per_commit: dict[str, float] = {}
    for r in results:
        for k, v in r["sql_s"].items():
            per_commit[k] = per_commit.get(k, 0.0) + v
    per_commit_ms = {k: round(v * 1000 / max(1, commits), 2) for k, v in per_commit.items()}
    mean_commit_ms = 1000 * sum(commit_s) / max(1, len(commit_s))
    per_commit_ms["COMMIT, hashing, the rest"] = round(mean_commit_ms - sum(per_commit_ms.values()), 2)
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [0.0] * 99
    return Cell(
        writers=writers,
        tenancy=tenancy,
        events=events,
        seconds=round(wall, 2),
        events_per_s=round(events / wall, 1),
        per_writer_events_per_s=[round(r["events"] / r["seconds"], 1) for r in results],
        commits_per_s=round(commits / wall, 1),
        mean_batch=round(statistics.fmean([n for r in results for n in r["batch"]]), 1),
        commit_ms_p50=round(commit_s[len(commit_s) // 2] * 1000, 2) if commit_s else 0.0,
        p50_ms=round(q[49], 2),
        p99_ms=round(q[98], 2),
        lock_waiters_mean=round(statistics.fmean(samples), 2) if samples else 0.0,
        lock_waiters_max=max(samples, default=0),
        pg_cpu_s=round(pg_cpu, 2),
        writers_cpu_s=round(w_cpu, 2),
        machine_busy_pct=round(busy * 100, 1),
        **checked,
        per_commit_ms=per_commit_ms,
    )


# --------------------------------------------------------------------------- report


def _row(c: Cell) -> str:
    ok = c.missing == 0 and c.unexpected == 0 and c.stored == c.distinct_request_ids and c.chain_ok
    return (
        f"| {c.writers} | {c.tenancy} | {c.events_per_s:,.0f} | "
        f"{' + '.join(f'{x:,.0f}' for x in c.per_writer_events_per_s)} | {c.commits_per_s:,.0f} | "
        f"{c.mean_batch} | "
        f"{c.commit_ms_p50} | {c.p50_ms} | {c.p99_ms} | {c.lock_waiters_mean} (max {c.lock_waiters_max}) | "
        f"{c.pg_cpu_s / c.seconds:.2f} / {c.writers_cpu_s / c.seconds:.2f} | {c.machine_busy_pct} | "
        f"{c.stored:,} / {c.missing} / {c.stored - c.distinct_request_ids} / {'yes' if ok else 'NO'} / "
        f"{'yes' if c.tenant_seq_ok else 'NO'} |"
    )


HEADER = (
    "| writers | tenants | events/s | per writer | commits/s | events per commit | commit ms p50 | "
    "append p50 ms | p99 ms | writers waiting on a lock | CPU cores: rest (PostgreSQL) / writers | "
    "machine busy % | "
    "stored / lost / doubled / chain verifies | tenant_seq 1..n |\n"
    "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- |"
)


_PARTS = (*dict.fromkeys(n for _p, n in STATEMENTS), "other", "COMMIT, hashing, the rest")


def write(cells: list[Cell], meta: dict[str, Any], out: Path) -> Path:
    from bench.fleet import keep_analysis

    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{meta['when'][:10]}-ledger-writers{'-' + meta['tag'] if meta['tag'] else ''}"
    base.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "cells": [asdict(c) for c in cells]}, indent=2) + "\n"
    )
    lines = [
        "# Ledger events/s with several writer processes on one PostgreSQL (issue 14)",
        "",
        f"{meta['when']}, `python -m bench.ledger_writers`, one run, {meta['seconds']:g} s per cell, "
        f"{meta['inflight']} appends in flight per writer. Machine: {meta['machine']}. PostgreSQL "
        "15 (fsync on) on loopback, the writers and PostgreSQL sharing the same cores. Each cell starts "
        f"from a fresh database holding {PREFILL:,} events of the same tenants, analyzed. Product code: "
        f"{meta['product_code']}.",
        "",
        HEADER,
        *[_row(c) for c in cells],
        "",
        "Where a commit's time goes (ms per commit, mean over all commits of the cell; `take the chain "
        "lock` includes waiting for it):",
        "",
        "| writers | tenants | " + " | ".join(_PARTS) + " |",
        "| ---: | --- |" + " ---: |" * len(_PARTS),
        *[
            f"| {c.writers} | {c.tenancy} | "
            + " | ".join(str(c.per_commit_ms.get(p, 0.0)) for p in _PARTS)
            + " |"
            for c in cells
        ],
        "",
    ]
    path = base.with_suffix(".md")
    path.write_text(keep_analysis(path, "\n".join(lines)))
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["writer"]:
        url, seconds, inflight, tenants, start_at, out = argv[1:7]
        result = asyncio.run(_write(url, float(seconds), int(inflight), int(tenants), float(start_at)))
        Path(out).write_text(json.dumps(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--writers", default="1,2,4")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the results' file name (e.g. before-fix)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally: stop PostgreSQL
    from bench.fleet import machine
    from tests import pg

    m = machine()
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": (
            f"{m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB, {m['postgresql']}, git {m['git']}"
        ),
        "product_code": str(Path(store_sql_file()).parent.parent),
        "tag": args.tag,
        "seconds": args.seconds,
        "inflight": args.inflight,
    }
    server = pg.PgServer(fsync=True).start()
    cells: list[Cell] = []
    print(HEADER, flush=True)
    try:
        with tempfile.TemporaryDirectory() as work:
            for tenancy in TENANCIES:
                for n in (int(x) for x in args.writers.split(",")):
                    log(f"{n} writer(s), {tenancy} tenant(s)")
                    c = run_cell(
                        server, f"w{n}_{tenancy}", n, tenancy, args.seconds, args.inflight, Path(work)
                    )
                    cells.append(c)
                    print(_row(c), flush=True)
    finally:
        server.close()
    if not args.no_write:
        path = write(cells, meta, args.out)
        log(f"wrote {path} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
