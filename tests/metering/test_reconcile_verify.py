"""Reconciliation against a worker's own counters (a fake vLLM /metrics page), and checking the
ledger's hash chain and a tenant's downloaded events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

from metering.db import make_engine
from metering.events import Outcome
from metering.reconcile import (
    Counters,
    PeriodicReconciler,
    Reading,
    ScrapeError,
    Target,
    Tolerance,
    parse_worker_metrics,
    reconcile,
    run,
)
from metering.store_sql import UsageStore
from metering.verify import event_row, verify_event_rows
from serving import db_schema
from tests.metering.test_ledger_postgres import event

MODEL = "m"
EPOCH = datetime(2026, 3, 1, 11, 0, tzinfo=UTC).timestamp()


def page(prompt: int, cached: int, generation: int, *, epoch: float = EPOCH, model: str = MODEL) -> str:
    return f"""# TYPE process_start_time_seconds gauge
process_start_time_seconds {epoch - 5}
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{{engine="0",model_name="{model}"}} {prompt}.0
vllm:prompt_tokens_created{{engine="0",model_name="{model}"}} {epoch}
# TYPE vllm:prompt_tokens_cached counter
vllm:prompt_tokens_cached_total{{engine="0",model_name="{model}"}} {cached}.0
vllm:prompt_tokens_cached_created{{engine="0",model_name="{model}"}} {epoch}
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{engine="0",model_name="{model}"}} {generation}.0
vllm:generation_tokens_created{{engine="0",model_name="{model}"}} {epoch}
"""


@dataclass
class FakeMetrics:
    text: str = ""
    url: str = ""


@pytest.fixture
async def worker() -> AsyncIterator[FakeMetrics]:
    fake = FakeMetrics()

    async def metrics(_r: web.Request) -> web.Response:
        return web.Response(text=fake.text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield fake
    await runner.cleanup()


@pytest.fixture
def store(tmp_path: Path) -> UsageStore:
    e = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    db_schema.upgrade(e)
    return UsageStore(e)


def test_parse_sums_engines_and_prefers_the_counter_epoch() -> None:
    text = page(100, 10, 50) + 'vllm:prompt_tokens_total{engine="1",model_name="m"} 5.0\n'
    text += 'vllm:generation_tokens_total{engine="0",model_name="other"} 999.0\n'
    counters, epoch = parse_worker_metrics(text, MODEL)
    assert counters == Counters(105, 10, 50) and epoch == EPOCH
    with pytest.raises(ScrapeError):
        parse_worker_metrics(text, "unknown-model")


async def test_zero_drift_since_the_worker_started(store: UsageStore, worker: FakeMetrics) -> None:
    store.append_batch(
        [
            event(prompt=10, completion=5),
            event(prompt=20, completion=7),
            event(prompt=99, completion=99, worker="w-other"),
        ]
    )
    worker.text = page(30, 4, 12)  # event() gives cached = 2 per request
    report = await run(store, [Target("w-0", MODEL, worker.url)])
    assert report.ok and not report.unreachable
    assert {r.token_type: (r.ledger, r.worker_tokens, r.drift) for r in report.rows} == {
        "input": (26, 26, 0),
        "cached_input": (4, 4, 0),
        "output": (12, 12, 0),
    }


async def test_events_of_an_earlier_worker_process_are_not_compared(
    store: UsageStore, worker: FakeMetrics
) -> None:
    store.append_batch([event(prompt=50, completion=50, offset_s=-7200)])  # before this process started
    store.append_batch([event(prompt=10, completion=5)])
    worker.text = page(10, 2, 5)
    assert (await run(store, [Target("w-0", MODEL, worker.url)])).ok


async def test_under_metering_is_drift_and_cut_offs_get_slack(store: UsageStore, worker: FakeMetrics) -> None:
    store.append_batch(
        [event(prompt=10, completion=5), event(prompt=10, completion=3, outcome=Outcome.CLIENT_CANCELLED)]
    )
    worker.text = page(20, 4, 10)  # the cancelled request made 2 more tokens before the abort reached it
    report = await run(store, [Target("w-0", MODEL, worker.url)], tolerance=Tolerance(cutoff_slack=4))
    out = next(r for r in report.rows if r.token_type == "output")
    assert (out.drift, out.cut_off, out.ok) == (-2, 1, True)
    strict = await run(store, [Target("w-0", MODEL, worker.url)], tolerance=Tolerance(cutoff_slack=0))
    assert not strict.ok
    worker.text = page(25, 4, 8)  # 5 prompt tokens the ledger does not have: never explained by slack
    missing = await run(store, [Target("w-0", MODEL, worker.url)], tolerance=Tolerance(cutoff_slack=100))
    bad = next(r for r in missing.rows if r.token_type == "input")
    assert not missing.ok and bad.drift == -5 and bad.ratio == pytest.approx(-5 / 21)


async def test_since_uses_the_last_snapshot_of_the_same_worker_process(
    store: UsageStore, worker: FakeMetrics
) -> None:
    store.append_batch([event(prompt=10, completion=5)])
    worker.text = page(10, 2, 5)
    first = await run(store, [Target("w-0", MODEL, worker.url)])  # saves a snapshot
    assert first.ok
    mark = datetime.now(UTC)
    store.append_batch([event(prompt=7, completion=3)])
    worker.text = page(17 + 40, 4, 8 + 40)  # 40 + 40 tokens served after the snapshot, not in this ledger
    since = await run(
        store, [Target("w-0", MODEL, worker.url)], since=mark + timedelta(seconds=1), save_snapshot=False
    )
    assert not since.ok  # 40 tokens the ledger never saw
    worker.text = page(17, 4, 8)
    ok = await run(
        store, [Target("w-0", MODEL, worker.url)], since=mark + timedelta(seconds=1), save_snapshot=False
    )
    assert ok.ok and "snapshot" in next(iter(ok.baselines.values()))
    # a restarted worker (new counter epoch): its old snapshots do not apply, its start does
    worker.text = page(0, 0, 0, epoch=datetime.now(UTC).timestamp())
    restarted = await run(store, [Target("w-0", MODEL, worker.url)], since=mark, save_snapshot=False)
    assert restarted.ok and "worker start" in next(iter(restarted.baselines.values()))


async def test_unreachable_worker_is_reported(store: UsageStore) -> None:
    report = await run(store, [Target("w-0", MODEL, "http://127.0.0.1:9")], save_snapshot=False)
    assert "w-0" in report.unreachable and report.rows == []


async def test_periodic_reconciler_is_incremental_and_sets_the_gauges(
    store: UsageStore, worker: FakeMetrics
) -> None:
    seen: dict[tuple[str, str, str], int] = {}
    rec = PeriodicReconciler(
        store,
        lambda: [Target("w-0", MODEL, worker.url)],
        lambda r: seen.__setitem__((r.worker, r.model, r.token_type), r.drift),
        0,
        lambda: None,
    )
    store.append_batch([event(prompt=10, completion=5)])
    worker.text = page(10, 2, 5)
    assert (await rec.once()).ok
    store.append_batch([event(prompt=10, completion=5)])
    worker.text = page(20, 4, 13)
    report = await rec.once()
    assert seen[("w-0", MODEL, "output")] == -3 and not report.ok


def test_reconcile_pure_function_with_readings(store: UsageStore) -> None:
    store.append_batch([event(prompt=10, completion=5)])
    r = Reading(Target("w-0", MODEL, "x"), datetime.now(UTC), EPOCH, Counters(10, 2, 5))
    assert reconcile(store, [r], upto_seq=store.max_seq()).ok
    assert not reconcile(store, [r], upto_seq=0).ok  # nothing committed yet at that position


# --- a tenant checks its own download ---------------------------------------------------------------
def test_downloaded_events_verify_and_total_without_the_database(store: UsageStore, tmp_path: Path) -> None:
    store.append_batch(
        [
            event(tenant="t-a", prompt=10, completion=5),
            event(tenant="t-b"),
            event(tenant="t-a", prompt=20, completion=1),
        ]
    )
    rows = [event_row(s) for s in store.iter_events(tenant_id="t-a")]
    report = verify_event_rows(json.loads(json.dumps(rows)))
    assert report.ok and (report.events, report.prompt_tokens, report.completion_tokens) == (2, 30, 6)
    tampered = [dict(r) for r in rows]
    tampered[1]["completion_tokens"] = 0
    bad = verify_event_rows(tampered)
    assert bad.first_break is not None and bad.first_break.kind == "edited"

    path = tmp_path / "events.json"
    path.write_text(json.dumps({"object": "list", "data": rows}))
    cli = [
        sys.executable,
        "-c",
        "from serving.cli import main; main()",
        "usage",
        "verify",
        "--file",
        str(path),
        "--json",
    ]
    env = {**os.environ, "TOKENPORT_DATA_DIR": str(tmp_path / "none")}
    out = subprocess.run(cli, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completion_tokens"] == 6
    path.write_text("\n".join(json.dumps(r) for r in tampered))
    out = subprocess.run(cli, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and json.loads(out.stdout)["first_break"]["kind"] == "edited"
