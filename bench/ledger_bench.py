"""Ledger append throughput and the latency cost of commit-before-complete, SQLite and PostgreSQL.

    .venv/bin/python -m bench.ledger_bench [--seconds 3] [--no-postgres] [--out bench/results]

Every request's usage event is committed before its response completes (before the body of a
non-streamed answer, before a stream's `data: [DONE]`). `await ledger.append(event)` is exactly the
time that adds to a request, so this measures it directly: C concurrent "requests" (asyncio tasks),
each appending one event after another for S seconds, against

- SQLite (the embedded default: WAL, synchronous=FULL, BEGIN IMMEDIATE) in a temporary file;
- PostgreSQL 15 from Debian, started on loopback by tests/pg.py with fsync ON (durable commits).

Group commit: events that arrive while a transaction runs go into the next one, so the cost per
request is about one commit whatever the load. `max_batch=1` (one transaction per event) is measured
too, to show what group commit buys. Results: bench/results/ledger.md and ledger.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.ledger import Ledger, Spool
from metering.store_sql import UsageStore
from serving import db_schema

CONCURRENCY = (1, 8, 64, 256)


@dataclass
class Result:
    backend: str
    concurrency: int
    max_batch: int
    events: int
    seconds: float
    events_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float


def _event() -> UsageEvent:
    now = datetime.now(UTC)
    return UsageEvent(
        request_id="req_" + uuid.uuid4().hex,
        tenant_id="bench",
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


async def _run(url: str, backend: str, concurrency: int, seconds: float, max_batch: int) -> Result:
    engine = make_engine(url)
    db_schema.upgrade(engine)
    store = UsageStore(engine)
    batches: list[int] = []
    with tempfile.TemporaryDirectory() as spool_dir:
        ledger = Ledger(
            store,
            Spool(Path(spool_dir) / "spool.jsonl"),
            max_batch=max_batch,
            on_commit=lambda _s, n: batches.append(n),
        )
        await ledger.start()
        latencies: list[float] = []
        await ledger.append(_event())  # warm the connection pool
        batches.clear()
        deadline = time.perf_counter() + seconds

        async def producer() -> None:
            while time.perf_counter() < deadline:
                e = _event()
                t = time.perf_counter()
                await ledger.append(e)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        await ledger.close()
    engine.dispose()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return Result(
        backend,
        concurrency,
        max_batch,
        len(latencies),
        round(elapsed, 2),
        round(len(latencies) / elapsed, 1),
        round(q[49] * 1000, 2),
        round(q[89] * 1000, 2),
        round(q[98] * 1000, 2),
        round(statistics.fmean(batches), 1) if batches else 0.0,
    )


def _sqlite_url(tmp: Path) -> str:
    return f"sqlite:///{tmp / ('b-' + uuid.uuid4().hex[:8] + '.db')}"


async def bench(seconds: float, postgres: bool) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        backends: list[tuple[str, object]] = [("sqlite", lambda: _sqlite_url(Path(tmp)))]
        server = None
        if postgres:
            from tests import pg

            if pg.available():
                server = pg.PgServer(fsync=True).start()
                counter = iter(range(1000))

                def pg_url() -> str:
                    from sqlalchemy import create_engine, text

                    assert server is not None
                    name = f"bench_{next(counter)}"
                    admin = create_engine(
                        server.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
                    )
                    with admin.connect() as conn:
                        conn.execute(text(f'CREATE DATABASE "{name}"'))
                    admin.dispose()
                    return server.url.rsplit("/", 1)[0] + "/" + name

                backends.append(("postgresql", pg_url))
        try:
            for name, make_url in backends:
                for c in CONCURRENCY:
                    r = await _run(make_url(), name, c, seconds, 512)  # type: ignore[operator]
                    results.append(r)
                    print(_row(r), flush=True)
                r = await _run(make_url(), name, 64, seconds, 1)  # type: ignore[operator]
                results.append(r)
                print(_row(r), flush=True)
        finally:
            if server is not None:
                server.close()
    return results


def _row(r: Result) -> str:
    mode = "group commit" if r.max_batch > 1 else "one commit per event"
    return (
        f"| {r.backend} | {r.concurrency} | {mode} | {r.events_per_s:,.0f} | {r.p50_ms} | {r.p90_ms} | "
        f"{r.p99_ms} | {r.mean_batch} |"
    )


def write(results: list[Result], out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in load],
        "seconds_per_run": seconds,
    }
    (out / "ledger.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)
    )
    lines = [
        "# Ledger append throughput and commit-before-complete latency",
        "",
        (
            f"{meta['when']}, {meta['cpus']} CPUs, load average {meta['loadavg']} (shared machine), "
            f"{seconds:g} s per run. `python -m bench.ledger_bench`."
        ),
        "",
        "Latency = time `await ledger.append(event)` takes = what committing the usage event before the",
        "response completes adds to each request. SQLite: WAL, synchronous=FULL. PostgreSQL 15: fsync on.",
        "",
        "| backend | concurrent requests | mode | events/s | p50 ms | p90 ms | p99 ms | events per commit |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        *[_row(r) for r in results],
        "",
    ]
    (out / "ledger.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    print(
        "| backend | concurrent requests | mode | events/s | p50 ms | p90 ms | p99 ms | events per commit |"
    )
    results = asyncio.run(bench(args.seconds, not args.no_postgres))
    write(results, args.out, args.seconds)
    print(f"wrote {args.out / 'ledger.md'}")


if __name__ == "__main__":
    main()
