"""Data retention: prompts and completions are never stored or logged by default; a tenant's
content_logging setting stores them (request and completion) until its retention period ends."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from metering.tenants import to_naive, utcnow
from serving.content_log import ContentLogStore
from serving.tables import content_log
from tests.conftest import MODEL, Gateway
from tests.fakes import FakeWorker
from tests.serving.limits_support import bearer, chat, guarded_gateway, set_limits, stream_all


@pytest.fixture(scope="module")
async def gw(fake: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with guarded_gateway(tmp_path_factory.mktemp("retention"), [(MODEL, "f0", fake.url)]) as g:
        yield g


def database_bytes(gw: Gateway) -> bytes:
    db = Path(gw.settings.db_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


async def test_no_prompt_or_completion_is_stored_or_logged_by_default(
    gw: Gateway, worker: FakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    _t, _k, api_key = gw.new_tenant()
    marker = "secret-prompt-" + uuid.uuid4().hex
    worker.behave(tokens=3)
    caplog.set_level(logging.DEBUG)
    r = await gw.http.post("/v1/chat/completions", json=chat(marker, max_tokens=3), headers=bearer(api_key))
    assert r.status_code == 200
    status, _h, _d = await stream_all(gw.http, api_key, chat(marker, max_tokens=3))
    assert status == 200
    bad = await gw.http.post(
        "/v1/chat/completions", json=chat(marker, max_tokens=3, bogus=1), headers=bearer(api_key)
    )
    assert bad.status_code == 400 and marker not in bad.text
    await asyncio.sleep(0.3)
    assert marker.encode() not in database_bytes(gw)
    assert b" w0 w1 w2" not in database_bytes(gw)  # the completion either
    assert not [rec for rec in caplog.records if marker in rec.getMessage()]
    assert ContentLogStore(gw.engine).for_tenant(_t.id) == []


async def test_content_logging_stores_prompt_and_completion_until_retention_ends(
    gw: Gateway, worker: FakeWorker
) -> None:
    t, key, api_key = gw.new_tenant()
    await set_limits(gw, t.id, content_logging=True, content_retention_days=7)
    marker = "logged-prompt-" + uuid.uuid4().hex
    worker.behave(tokens=3)
    r = await gw.http.post("/v1/chat/completions", json=chat(marker, max_tokens=3), headers=bearer(api_key))
    status, headers, _d = await stream_all(gw.http, api_key, chat(marker + "-stream", max_tokens=3))
    assert r.status_code == 200 and status == 200
    store = ContentLogStore(gw.engine)
    for _ in range(50):
        rows = store.for_tenant(t.id)
        if len(rows) == 2:
            break
        await asyncio.sleep(0.05)
    by_id = {row["request_id"]: row for row in rows}
    plain, streamed = by_id[r.headers["x-request-id"]], by_id[headers["x-request-id"]]
    assert marker in plain["request"] and plain["completion"] == " w0 w1 w2"
    assert marker + "-stream" in streamed["request"] and streamed["completion"] == " w0 w1 w2"
    assert plain["key_id"] == key.id and plain["model"] == MODEL
    assert timedelta(days=6, hours=23) < plain["expires_at"] - plain["created_at"] <= timedelta(days=7)

    # Past retention, the purge (every gateway runs it every few minutes) deletes them.
    with gw.engine.begin() as conn:
        conn.execute(
            update(content_log)
            .where(content_log.c.request_id == plain["request_id"])
            .values(expires_at=to_naive(utcnow() - timedelta(seconds=1)))
        )
    assert store.purge() == 1
    assert [row["request_id"] for row in store.for_tenant(t.id)] == [streamed["request_id"]]

    await set_limits(gw, t.id, content_logging=False)
    r = await gw.http.post(
        "/v1/chat/completions", json=chat(marker + "-off", max_tokens=3), headers=bearer(api_key)
    )
    await asyncio.sleep(0.2)
    assert len(store.for_tenant(t.id)) == 1
