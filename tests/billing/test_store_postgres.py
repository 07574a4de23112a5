"""billing.store on a real PostgreSQL (a throwaway server started for this module).

PostgreSQL runs READ COMMITTED with real concurrency: without ``SELECT ... FOR UPDATE`` on the
counter row two finalizations would read the same last number. Threads finalize concurrently and
the series must still be exactly 1..N; the immutability triggers and the per-tenant lock (a draft
made stale by a concurrent finalization is refused, never billed twice) are checked too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

import billing.issuing
from billing.errors import DocumentStateError
from billing.issuing import finalized_json
from billing.prices import load_price_source
from billing.service import BillingService
from billing.store import BillingStore, StaleDraft
from metering.clock import Period
from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving import db_schema

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "billing"
NOW = datetime(2026, 4, 2, tzinfo=UTC)
JAN = Period(2026, 1)


def _pg_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    pytest.fail("PostgreSQL server binaries (pg_ctl, initdb) are needed: `make system-deps` installs them")


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    bindir = _pg_bin()
    root = tmp_path_factory.mktemp("pg")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        os.chmod(root, 0o755)
        for parent in root.parents:  # runuser'd postgres must be able to reach the folder
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tokenport"]),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    subprocess.run(
        _as_postgres(
            [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        admin = create_engine(
            f"postgresql+psycopg://tokenport@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE billing"))
        admin.dispose()
        yield f"postgresql+psycopg://tokenport@127.0.0.1:{port}/billing"
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            check=False,
            capture_output=True,
        )


@pytest.fixture()
def engine(pg_url: str) -> Iterator[Engine]:
    e = make_engine(pg_url)
    db_schema.upgrade(e)
    with e.begin() as conn:  # a clean slate per test (triggers protect issued rows: drop them for the reset)
        conn.execute(text("ALTER TABLE billing_documents DISABLE TRIGGER USER"))
        conn.execute(text("ALTER TABLE billing_coverage DISABLE TRIGGER USER"))
        conn.execute(
            text(
                "TRUNCATE billing_coverage, billing_documents, billing_counters, billing_periods,"
                " billing_fx_rates, usage_events, api_keys, tenants CASCADE"
            )
        )
        conn.execute(text("ALTER TABLE billing_documents ENABLE TRIGGER USER"))
        conn.execute(text("ALTER TABLE billing_coverage ENABLE TRIGGER USER"))
    yield e
    e.dispose()


def service(engine: Engine) -> BillingService:
    return BillingService(
        store=BillingStore(engine),
        usage=UsageStore(engine),
        tenants=TenantStore(engine, "s" * 32),
        config_dir=CONFIGS,
        prices=load_price_source(CONFIGS / "price_books.yaml"),
        clock=lambda: NOW,
    )


def event(tenant: str, when: datetime, prompt: int = 3_000_000) -> UsageEvent:
    return UsageEvent(
        request_id="req_" + uuid.uuid4().hex,
        tenant_id=tenant,
        key_id="key_pg",
        model="smollm2-135m-instruct",
        origin_country="KZ",
        prompt_tokens=prompt,
        cached_prompt_tokens=0,
        completion_tokens=1_000_000,
        stream=False,
        outcome=Outcome.OK,
        started_at=when,
        finished_at=when,
    )


def tenants_with_usage(engine: Engine, count: int) -> list[str]:
    store = TenantStore(engine, "s" * 32)
    ids = [f"pg{i:03d}" for i in range(count)]
    for t in ids:
        store.create_tenant(id=t, name=t, billing_country="KZ", tax_id="123456789013")
    UsageStore(engine).append_batch([event(t, datetime(2026, 1, 12, tzinfo=UTC)) for t in ids])
    return ids


def test_concurrent_finalization_is_gapless(engine: Engine) -> None:
    ids = tenants_with_usage(engine, 40)
    svc = service(engine)
    assert len(svc.run(JAN).drafts) == 40
    got: list[str] = []
    crashed: list[BaseException] = []
    barrier = threading.Barrier(8)
    lock = threading.Lock()

    def worker(offset: int) -> None:
        try:
            barrier.wait()
            for t in ids[offset:] + ids[:offset]:
                try:
                    done = service(engine).finalize(JAN, tenant_id=t).finalized
                except DocumentStateError:
                    continue
                with lock:
                    got.extend(r.number or "" for r in done)
        except BaseException as exc:  # noqa: BLE001
            crashed.append(exc)

    threads = [threading.Thread(target=worker, args=(i * 5,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not crashed, crashed
    expected = [f"TP-INV-2026-{i:06d}" for i in range(1, 41)]
    assert sorted(got) == expected
    with engine.connect() as conn:
        stored = list(conn.execute(text("SELECT number FROM billing_documents ORDER BY number")).scalars())
    assert stored == expected
    assert svc.store.counter("TP-INV-2026") == 40


def test_a_draft_made_stale_concurrently_is_refused(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    [t] = tenants_with_usage(engine, 1)
    svc = service(engine)
    svc.run(JAN)
    svc.finalize(JAN)
    usage = UsageStore(engine)
    usage.append_batch([event(t, datetime(2026, 1, 30, tzinfo=UTC), 1_000)])  # late January usage
    usage.append_batch(
        [event(t, datetime(2026, 2, 3, tzinfo=UTC)), event(t, datetime(2026, 3, 3, tzinfo=UTC))]
    )
    # drafted with today's date (finalize() re-dates a draft; finalize_document numbers it as it is)
    svc.run(Period(2026, 2), issue_date=NOW.date())
    svc.run(Period(2026, 3), issue_date=NOW.date())
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def slow(draft: dict[str, Any], number: str) -> bytes:
        time.sleep(0.4)  # hold the transaction open: the other finalization runs meanwhile
        return finalized_json(draft, number)

    monkeypatch.setattr(billing.issuing, "finalized_json", slow)

    def worker(p: Period) -> None:
        row = svc.store.get(f"DRAFT-{p}-{t}")
        barrier.wait()
        try:
            service(engine).finalize_document(row.id)
            outcomes.append("ok")
        except StaleDraft:
            outcomes.append("stale")

    threads = [threading.Thread(target=worker, args=(p,)) for p in (Period(2026, 2), Period(2026, 3))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # Each finalize is refused only if the other billed the late January event first; both drafts
    # carry it, so exactly one of them can be finalized.
    assert sorted(outcomes) == ["ok", "stale"]
    assert sum(1 for r in svc.store.find(statuses=["finalized"]) if r.adjustment_rows) == 1


def test_issued_rows_are_protected_by_triggers(engine: Engine) -> None:
    tenants_with_usage(engine, 1)
    svc = service(engine)
    svc.run(JAN)
    [row] = svc.finalize(JAN).finalized
    for statement in (
        "UPDATE billing_documents SET document = '{}' WHERE number = :n",
        "UPDATE billing_documents SET status = 'draft' WHERE number = :n",
        "DELETE FROM billing_documents WHERE number = :n",
    ):
        with pytest.raises(DBAPIError, match="immutable"), engine.begin() as conn:
            conn.execute(text(statement), {"n": row.number})
    invoice, credit = svc.void(row.number or "", reason="test")
    assert (invoice.status, credit.number) == ("void", "TP-CRN-2026-000001")
    with pytest.raises(DBAPIError, match="immutable"), engine.begin() as conn:
        conn.execute(
            text("UPDATE billing_documents SET status = 'finalized' WHERE number = :n"), {"n": row.number}
        )
