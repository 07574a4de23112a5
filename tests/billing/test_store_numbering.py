"""billing.store on SQLite: gapless numbers under concurrent finalization, immutability, stale drafts.

Concurrency is real: several threads, then several OS processes, finalize the same set of drafts in
different orders against one SQLite file. Every draft must end up with exactly one number, and the
numbers of the series must be exactly 1..N.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

import billing.issuing
from billing.errors import DocumentStateError
from billing.prices import load_price_source
from billing.service import BillingService
from billing.store import BillingStore, StaleDraft
from metering.clock import Period
from metering.db import make_engine
from metering.events import Outcome, UsageEvent
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving import db_schema

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "billing"
MODEL = "smollm2-135m-instruct"
JAN = Period(2026, 1)
NOW = datetime(2026, 4, 2, 9, 0, tzinfo=UTC)


def event(
    tenant: str, when: datetime, prompt: int = 2_000_000, completion: int = 1_000_000, origin: str = "KZ"
) -> UsageEvent:
    return UsageEvent(
        request_id="req_" + uuid.uuid4().hex,
        tenant_id=tenant,
        key_id="key_test",
        model=MODEL,
        origin_country=origin,
        prompt_tokens=prompt,
        cached_prompt_tokens=0,
        completion_tokens=completion,
        stream=False,
        outcome=Outcome.OK,
        started_at=when,
        finished_at=when,
        language="ru",
    )


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    engine = make_engine(url)
    db_schema.upgrade(engine)
    yield url, engine
    engine.dispose()


def service(engine: Engine) -> BillingService:
    return BillingService(
        store=BillingStore(engine),
        usage=UsageStore(engine),
        tenants=TenantStore(engine, "s" * 32),
        config_dir=CONFIGS,
        prices=load_price_source(CONFIGS / "price_books.yaml"),
        clock=lambda: NOW,
    )


def with_drafts(engine: Engine, count: int) -> list[str]:
    """`count` KZ business tenants with January usage and their drafts; returns the tenant ids."""
    tenants = TenantStore(engine, "s" * 32)
    ids = [f"t{i:03d}" for i in range(count)]
    for t in ids:
        tenants.create_tenant(id=t, name=f"Tenant {t}", billing_country="KZ", tax_id="123456789013")
    UsageStore(engine).append_batch([event(t, datetime(2026, 1, 10, tzinfo=UTC)) for t in ids])
    report = service(engine).run(JAN)
    assert not report.errors and len(report.drafts) == count
    return ids


def numbers(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT number FROM billing_documents WHERE number IS NOT NULL ORDER BY number")
            ).scalars()
        )


def assert_gapless(engine: Engine, count: int) -> None:
    got = numbers(engine)
    assert got == [f"TP-INV-2026-{i:06d}" for i in range(1, count + 1)], got
    assert BillingStore(engine).counter("TP-INV-2026") == count


def test_threads_finalize_gapless(db: tuple[str, Engine]) -> None:
    _, engine = db
    ids = with_drafts(engine, 30)
    finalized: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    crashed: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            work(seed)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            crashed.append(exc)

    def work(seed: int) -> None:
        svc = service(engine)
        order = ids[:]
        random.Random(seed).shuffle(order)
        barrier.wait()
        for t in order:
            try:
                report = svc.finalize(JAN, tenant_id=t)
            except DocumentStateError:  # another thread finalized it: no draft left
                with lock:
                    refused.append(t)
                continue
            with lock:
                finalized.extend(r.number or "" for r in report.finalized)
                refused.extend(t for t, _ in report.refused)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not crashed, crashed
    assert sorted(finalized) == [f"TP-INV-2026-{i:06d}" for i in range(1, 31)]
    assert len(refused) == 30 * 5
    assert_gapless(engine, 30)


SCRIPT = r"""
import json, random, sys, time
from pathlib import Path
from metering.db import make_engine
from billing.errors import DocumentStateError
from billing.prices import load_price_source
from billing.service import BillingService
from billing.store import BillingStore
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
url, start, seed, root = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
engine = make_engine(url)
store = BillingStore(engine)
svc = BillingService(store=store, usage=UsageStore(engine), tenants=TenantStore(engine, "s" * 32),
                     config_dir=root / "configs" / "billing",
                     prices=load_price_source(root / "configs" / "billing" / "price_books.yaml"))
numbering = svc.config().seller.numbering
ids = [r.id for r in store.find(kinds=["invoice"], statuses=["draft"])]
random.Random(seed).shuffle(ids)
(start.parent / f"ready-{seed}").touch()
while not start.exists():
    time.sleep(0.005)
got = []
for i in ids:
    try:
        got.append(svc.finalize_document(i, numbering).number)
    except DocumentStateError:
        pass
    time.sleep(0.005)  # other work between two finalizations: lets the others take the lock
print(json.dumps(got))
"""


def test_processes_finalize_gapless(db: tuple[str, Engine], tmp_path: Path) -> None:
    url, engine = db
    with_drafts(engine, 40)
    start = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, url, str(start), str(seed), str(ROOT)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < len(procs):  # every process has its list of drafts
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not start"
        time.sleep(0.02)
    start.touch()
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(json.loads(out))
    issued = [n for out in outputs for n in out]
    assert sorted(issued) == [f"TP-INV-2026-{i:06d}" for i in range(1, 41)]
    assert sum(1 for out in outputs if out) >= 2, "the processes did not contend"
    assert_gapless(engine, 40)


def test_finalize_twice_refused_and_number_not_consumed(db: tuple[str, Engine]) -> None:
    _, engine = db
    [t] = with_drafts(engine, 1)
    svc = service(engine)
    [row] = svc.finalize(JAN, tenant_id=t).finalized
    with pytest.raises(DocumentStateError, match="no draft"):
        svc.finalize(JAN, tenant_id=t)
    with pytest.raises(DocumentStateError, match="only a draft can be finalized"):
        svc.finalize_document(row.id)
    assert_gapless(engine, 1)


def test_failed_finalization_rolls_the_counter_back(
    db: tuple[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, engine = db
    ids = with_drafts(engine, 2)
    svc = service(engine)
    draft = svc.store.get(f"DRAFT-2026-01-{ids[0]}")

    def broken(_draft: dict[str, Any], _number: str) -> None:
        raise RuntimeError("renderer crashed after the number was taken")

    with monkeypatch.context() as patch:
        patch.setattr(billing.issuing, "finalized", broken)
        with pytest.raises(RuntimeError):
            svc.finalize_document(draft.id)
    assert svc.store.counter("TP-INV-2026") == 0
    assert svc.store.get(draft.ref).status == "draft"
    report = svc.finalize(JAN)
    assert [r.number for r in report.finalized] == ["TP-INV-2026-000001", "TP-INV-2026-000002"]


def test_issued_documents_are_immutable_in_the_database(db: tuple[str, Engine]) -> None:
    _, engine = db
    with_drafts(engine, 1)
    svc = service(engine)
    [row] = svc.finalize(JAN).finalized
    before = svc.render(row.number or "", "json")
    for statement in (
        "UPDATE billing_documents SET document = '{}' WHERE number = :n",
        "UPDATE billing_documents SET total = '0.00' WHERE number = :n",
        "UPDATE billing_documents SET status = 'draft' WHERE number = :n",
        "DELETE FROM billing_documents WHERE number = :n",
        (
            "DELETE FROM billing_coverage"
            " WHERE document_id = (SELECT id FROM billing_documents WHERE number = :n)"
        ),
    ):
        with pytest.raises((IntegrityError, DBAPIError), match="immutable"), engine.begin() as conn:
            conn.execute(text(statement), {"n": row.number})
    assert svc.render(row.number or "", "json") == before
    assert json.loads(before)["status"] == "finalized"


def test_stale_draft_is_refused_instead_of_billing_twice(db: tuple[str, Engine]) -> None:
    """Two open drafts both pick up the same late January usage; only the first may finalize it."""
    _, engine = db
    [t] = with_drafts(engine, 1)
    svc = service(engine)
    svc.finalize(JAN)
    usage = UsageStore(engine)
    usage.append_batch([event(t, datetime(2026, 1, 31, 23, 59, tzinfo=UTC), 500_000, 0)])  # late January
    usage.append_batch(
        [event(t, datetime(2026, 2, 5, tzinfo=UTC)), event(t, datetime(2026, 3, 5, tzinfo=UTC))]
    )
    feb, mar = svc.run(Period(2026, 2)), svc.run(Period(2026, 3))
    assert feb.drafts[0].adjustment_rows and mar.drafts[0].adjustment_rows  # both saw the late event
    assert svc.finalize(Period(2026, 2), tenant_id=t).finalized
    with pytest.raises(StaleDraft, match="run `tokenport invoices run` again"):
        svc.finalize_document(mar.drafts[0].id)
    refreshed = svc.run(Period(2026, 3))
    assert refreshed.drafts[0].adjustment_rows == []
    assert svc.finalize(Period(2026, 3), tenant_id=t).finalized
    assert_gapless(engine, 3)


def test_one_live_invoice_per_tenant_and_period(db: tuple[str, Engine]) -> None:
    _, engine = db
    [t] = with_drafts(engine, 1)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO billing_documents"
                " (kind, tenant_id, period, status, event_count, created_at, updated_at)"
                " VALUES ('invoice', :t, '2026-01', 'draft', 0, :now, :now)"
            ),
            {"t": t, "now": NOW.replace(tzinfo=None)},
        )


def test_fx_rates_stored_once_and_contradictions_refused(db: tuple[str, Engine]) -> None:
    _, engine = db
    svc = service(engine)
    csv = "date,base,quote,rate,source\n2027-01-01,USD,CNY,7.1111,test:PBOC\n"
    assert svc.import_fx(csv, origin="a.csv") == (1, 0)
    assert svc.import_fx(csv, origin="a.csv") == (0, 1)
    from billing.errors import FxImportError

    with pytest.raises(FxImportError, match="two different USD/CNY rates"):
        svc.import_fx(csv.replace("7.1111", "7.2"), origin="b.csv")
    with pytest.raises(FxImportError, match="two different"):  # contradicts the shipped file
        svc.import_fx("date,base,quote,rate,source\n2026-01-01,USD,CNY,1.0,x\n", origin="c.csv")
    used = svc.config().fx.rate("USD", "CNY", date(2027, 1, 1))
    assert (used.rate, used.source) == (__import__("decimal").Decimal("7.1111"), "test:PBOC")
