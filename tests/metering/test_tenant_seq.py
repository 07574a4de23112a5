"""Per-tenant positions: every event gets `tenant_seq` (1, 2, ... among its tenant's events) in the
append transaction; the migration numbers the events stored before; the tenant API shows and pages
by it instead of the global `seq` (which counts every tenant's requests), and the tenant's own check
of its download still holds; the admin API and the chain keep `seq`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine

from metering.chain import GENESIS, chain_hash
from metering.db import make_engine
from metering.event_codec import codec
from metering.store_sql import UsageStore
from metering.verify import verify_chain, verify_event_rows
from serving import db_schema
from tests.conftest import Gateway, TenantKey
from tests.fakes import FakeWorker
from tests.metering.conftest import EventFactory
from tests.serving.helpers import auth, chat_body


def test_each_tenant_is_numbered_on_its_own(engine: Engine, event: EventFactory) -> None:
    store = UsageStore(engine)
    tenants = ["a", "b", "a", "c", "a", "b"]
    store.append_batch([event(tenant_id=t) for t in tenants[:3]])
    store.append_batch([event(tenant_id=t) for t in tenants[3:]])
    store._append_sqlalchemy([event(tenant_id="b")])  # the other append path continues the numbering
    other_writer = UsageStore(engine)  # another process appending to the same file
    other_writer.append_batch([event(tenant_id="a")])
    store.append_batch([event(tenant_id="a")])  # notices the other writer's append
    got = [(s.event.tenant_id, s.tenant_seq) for s in store.iter_events()]
    assert got == [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3), ("b", 2), ("b", 3), ("a", 4), ("a", 5)]
    assert [s.tenant_seq for s in store.iter_events(tenant_id="a", after_tenant_seq=3)] == [4, 5]


TEXT_SIZE = (
    "prompt_chars",
    "prompt_bytes",
    "completion_chars",
    "completion_bytes",
)  # added by 0003_text_size


def test_the_migration_numbers_the_events_stored_before(tmp_path: Path, event: EventFactory) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = db_schema.alembic_config(str(engine.url))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002_billing")
    prev = GENESIS
    events = [event(tenant_id=t) for t in ["x", "y", "x", "x", "y"]]
    with engine.begin() as conn:  # rows as the former code wrote them: no tenant_seq
        for e in events:
            h = chain_hash(prev, e)
            old = {k: v for k, v in codec().to_db(e).items() if k not in TEXT_SIZE}  # columns of 0002
            row = {
                **old,
                "recorded_at": codec().to_db(e)["finished_at"],
                "prev_hash": prev,
                "hash": h,
            }
            conn.execute(
                text(
                    f"INSERT INTO usage_events ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"
                ),
                row,
            )
            prev = h
    db_schema.upgrade(engine)
    store = UsageStore(engine)
    assert [(s.event.tenant_id, s.tenant_seq) for s in store.iter_events()] == [
        ("x", 1),
        ("y", 1),
        ("x", 2),
        ("x", 3),
        ("y", 2),
    ]
    assert verify_chain(store.iter_events()).ok  # no hash changed
    store.append_batch([event(tenant_id="y"), replace(events[0], request_id="req_new_x")])
    assert [s.tenant_seq for s in store.iter_events(tenant_id="y")] == [1, 2, 3]
    assert [s.tenant_seq for s in store.iter_events(tenant_id="x")][-1] == 4
    engine.dispose()


async def test_the_tenant_api_shows_its_own_positions_only(
    gateway: Gateway, tenant: TenantKey, worker: FakeWorker
) -> None:
    _t, _k, other = gateway.new_tenant()
    ids: list[str] = []
    for i in range(6):  # the two tenants' requests interleave in the ledger
        key = tenant.api_key if i % 2 == 0 else other
        r = await gateway.http.post("/v1/chat/completions", json=chat_body(f"Hello {i}"), headers=auth(key))
        assert r.status_code == 200
        await gateway.wait_event(r.headers["x-request-id"])
        if key == tenant.api_key:
            ids.append(r.headers["x-request-id"])
    rows = []
    after = 0
    while True:
        page = (
            await gateway.http.get(
                "/v1/usage/events", params={"after": after, "limit": 2}, headers=auth(tenant.api_key)
            )
        ).json()
        rows.extend(page["data"])
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert [r["request_id"] for r in rows] == ids
    assert [r["tenant_seq"] for r in rows] == [1, 2, 3]  # nothing about the other tenant's traffic
    assert all("seq" not in r for r in rows)
    report = verify_event_rows(rows)
    assert report.ok and report.events == 3 and report.head_seq == 3
    rows[1], rows[2] = rows[2], rows[1]
    assert not verify_event_rows(rows).ok  # out of order
    admin = (
        await gateway.http.get(
            "/admin/v1/usage/events",
            params={"tenant": tenant.tenant.id},
            headers={"Authorization": "Bearer local-admin-token"},
        )
    ).json()
    assert [r["seq"] for r in admin["data"]] == sorted(r["seq"] for r in admin["data"])
    assert [r["seq"] for r in admin["data"]][-1] >= 5  # the global position stays for the operator
