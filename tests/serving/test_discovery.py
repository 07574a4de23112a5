"""Workers changed without a restart (issue 14): a watched workers file adds a worker after its health
check and drains a removed one (its stream finishes, no new request reaches it); a bad edit keeps the
last good set; a `resolve: true` name becomes one worker per DNS address; outlier ejection takes a
worker that fails requests in a row out until its time is up. Against fake workers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from serving.proxy.pool import Worker, WorkerPool
from tests.conftest import MODEL, Gateway, metric
from tests.fakes import FakeWorker
from tests.serving.helpers import auth, chat_body, stream_raw
from tests.serving.limits_support import guarded_gateway

FakeFactory = Callable[[], Awaitable[FakeWorker]]


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def write_workers(path: Path, *entries: dict[str, object]) -> None:
    path.write_text(yaml.safe_dump({"workers": list(entries)}), encoding="utf-8")
    now = time.time() + 1  # a new mtime even within the same second
    os.utime(path, (now, now))


@pytest.fixture()
async def setup(
    tmp_path: Path, fake_factory: FakeFactory
) -> AsyncIterator[tuple[Gateway, FakeWorker, FakeWorker, Path, str]]:
    a, b = await fake_factory(), await fake_factory()
    wfile = tmp_path / "workers.yaml"
    write_workers(wfile)
    env = {"TOKENPORT_WORKERS__FILE": str(wfile), "TOKENPORT_WORKERS__REFRESH_S": "0.1"}
    async with guarded_gateway(tmp_path / "gw", [(MODEL, "static-a", a.url)], env=env) as gw:
        _tenant, _key, plain = gw.new_tenant()
        yield gw, a, b, wfile, plain


async def test_a_worker_added_to_the_file_serves_and_a_removed_one_drains(
    setup: tuple[Gateway, FakeWorker, FakeWorker, Path, str],
) -> None:
    gw, a, b, wfile, plain = setup
    write_workers(wfile, {"model": MODEL, "base_url": b.url, "id": "file-b"})
    await until(lambda: any(w.id == "file-b" and w.healthy for w in gw.app.state.tokenport.pool.workers))
    a.behave(answer_delay_s=0.3)  # at once, least loaded spreads them over both
    rs = await asyncio.gather(
        *(gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain)) for _ in range(6))
    )
    assert all(r.status_code == 200 for r in rs)
    assert b.completion_requests() and a.completion_requests()

    b.behave(delay_s=0.1, tokens=20)  # a 2 s stream on b, then b is removed from the file
    a.behave(delay_s=0.1, tokens=20)
    streams = [asyncio.create_task(stream_raw(gw.http, plain, chat_body(stream=True))) for _ in range(4)]
    await until(lambda: any(not r.finished for r in b.completion_requests()))
    write_workers(wfile)
    await until(lambda: all(w.draining for w in gw.app.state.tokenport.pool.workers if w.id == "file-b"))
    before = len(b.completion_requests())
    a.behave(delay_s=0.0, tokens=3)
    for _ in range(6):
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
        assert r.status_code == 200
    assert len(b.completion_requests()) == before  # no new request reached the draining worker
    outs = await asyncio.gather(*streams)
    assert all(o.status == 200 and o.done for o in outs)  # its streams finished
    await until(lambda: not any(w.id == "file-b" for w in gw.app.state.tokenport.pool.workers))


async def test_a_bad_edit_keeps_the_last_good_set(
    setup: tuple[Gateway, FakeWorker, FakeWorker, Path, str],
) -> None:
    gw, _a, b, wfile, _plain = setup
    write_workers(wfile, {"model": MODEL, "base_url": b.url, "id": "file-b"})
    await until(lambda: any(w.id == "file-b" and w.healthy for w in gw.app.state.tokenport.pool.workers))
    write_workers(wfile, {"model": "no-such-model", "base_url": b.url})
    await asyncio.sleep(0.5)
    pool = gw.app.state.tokenport.pool
    assert any(w.id == "file-b" and not w.draining for w in pool.workers)


async def test_a_resolved_name_is_one_worker_per_address(
    setup: tuple[Gateway, FakeWorker, FakeWorker, Path, str],
) -> None:
    gw, _a, b, wfile, _plain = setup
    port = b.url.rsplit(":", 1)[1]
    write_workers(wfile, {"model": MODEL, "base_url": f"http://localhost:{port}", "resolve": True})
    pool = gw.app.state.tokenport.pool
    await until(lambda: any(w.id == "localhost-127.0.0.1" and w.healthy for w in pool.workers))
    assert next(w for w in pool.workers if w.id == "localhost-127.0.0.1").url == f"http://127.0.0.1:{port}"


async def test_a_worker_failing_requests_in_a_row_is_ejected(
    setup: tuple[Gateway, FakeWorker, FakeWorker, Path, str],
) -> None:
    gw, a, b, wfile, plain = setup
    write_workers(wfile, {"model": MODEL, "base_url": b.url, "id": "file-b"})
    pool = gw.app.state.tokenport.pool
    await until(lambda: any(w.id == "file-b" and w.healthy for w in pool.workers))
    a.behave(status=500)  # healthy to /health, failing every request (picked first: least loaded, idle)
    statuses = []
    for _ in range(10):
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
        statuses.append(r.status_code)
    bad = next(w for w in pool.workers if w.id == "static-a")
    assert bad.ejections == 1 and not bad.healthy and bad.ejected_until > time.monotonic()
    assert statuses == [502] * 3 + [200] * 7  # the third failure in a row ejected it; b took the rest
    await asyncio.sleep(0.3)  # health checks (every 0.1 s) do not bring it back before its time
    assert not bad.healthy
    text = await gw.metrics()
    assert metric(text, "tokenport_worker_ejections_total", worker="static-a") == 1


def test_ejection_doubles_and_a_success_resets_it() -> None:
    w = Worker(id="w", model="m", url="http://x", region="r", healthy=True)
    pool = WorkerPool([w], eject_after=2, eject_base_s=1.0, eject_max_s=3.0)
    pool.note_failure(w)
    assert w.healthy and w.ejections == 0
    pool.note_failure(w)
    first = w.ejected_until - time.monotonic()
    assert not w.healthy and w.ejections == 1 and 0.9 < first <= 1.0
    w.ejected_until = 0  # its time is up
    pool.note_failure(w)
    second = w.ejected_until - time.monotonic()
    assert w.ejections == 2 and 1.9 < second <= 2.0
    w.ejected_until = 0
    pool.note_failure(w)
    assert 2.9 < w.ejected_until - time.monotonic() <= 3.0  # capped at eject_max_s
    pool.note_success(w)
    assert (w.failures, w.ejections) == (0, 0)


def test_replace_adds_drains_and_sweeps() -> None:
    a = Worker(id="a", model="m", url="http://a", region="r", healthy=True)
    b = Worker(id="b", model="m", url="http://b", region="r", healthy=True)
    pool = WorkerPool([a, b])
    b.inflight = 1
    added = pool.replace([a, Worker(id="c", model="m", url="http://c", region="r")])
    assert [w.id for w in added] == ["c"] and b.draining and b in pool.workers
    assert pool.pick("m").id == "a"  # c is not healthy yet, b drains
    b.inflight = 0
    pool.sweep()
    assert [w.id for w in pool.workers] == ["a", "c"]
