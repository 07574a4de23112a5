"""The worker fleet through a real gateway over fake workers: a 502/503/504 before the first byte fails
over once and is billed once, a single worker's 503 reaches the client as an error in OpenAI's shape,
a failure after the first byte is not retried, the session header keeps a session on one worker and
reaches it, the workers file's metrics (refused edits, workers by state, a drained worker's series
removed), and a bad workers file at start: ConfigError from create_app, exit 2 from the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from metering.events import Outcome
from serving.app import build_workers, create_app
from serving.deps import of_app
from serving.settings import ConfigError, load_settings
from tests.conftest import MODEL, metric, run_gateway, write_config
from tests.fakes import FakeWorker
from tests.serving.helpers import assert_openai_error, auth, chat_body, stream_raw
from tests.serving.limits_support import guarded_gateway
from tests.serving.test_discovery import until, write_workers

FakeFactory = Callable[[], Awaitable[FakeWorker]]
REPO = Path(__file__).resolve().parents[2]


# --- failover before the first byte --------------------------------------------------------------------
@pytest.mark.parametrize(("status", "stream"), [(503, False), (503, True), (502, False), (502, True)])
async def test_a_5xx_before_the_first_byte_fails_over_and_is_billed_once(
    tmp_path: Path, fake_factory: FakeFactory, status: int, stream: bool
) -> None:
    busy, free = await fake_factory(), await fake_factory()
    busy.behave(status=status, error_body={"error": "overloaded"})
    free.behave(tokens=5, prompt_tokens=17)
    async with run_gateway(
        tmp_path / "gw", [(MODEL, "w-busy", busy.url), (MODEL, "w-free", free.url)], health_interval_s=60
    ) as gw:
        tenant, _key, plain = gw.new_tenant()
        pool = of_app(gw.app).pool
        pool.workers[1].inflight = 5  # least loaded picks w-busy first
        if stream:
            out = await stream_raw(gw.http, plain, chat_body(stream=True))
            assert out.status == 200 and out.done
            rid = out.request_id
        else:
            r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
            rid = r.headers["x-request-id"]
        assert len(busy.completion_requests()) == 1 and len(free.completion_requests()) == 1
        await gw.wait_event(rid)
        [ev] = gw.events_for(tenant.id)  # only the attempt that answered is metered
        assert (ev.event.request_id, ev.event.outcome, ev.event.worker_id) == (rid, Outcome.OK, "w-free")
        assert (ev.event.prompt_tokens, ev.event.completion_tokens) == (17, 5)
        assert ev.event.serving_region == "region-w-free"
        assert pool.workers[0].failures == 1  # the 5xx counts towards ejecting w-busy


async def test_a_504_is_not_retried_the_engine_may_still_be_generating(
    tmp_path: Path, fake_factory: FakeFactory
) -> None:
    slow, free = await fake_factory(), await fake_factory()
    slow.behave(status=504, error_body={"error": "upstream timed out"})
    async with run_gateway(
        tmp_path / "gw", [(MODEL, "w-slow", slow.url), (MODEL, "w-free", free.url)], health_interval_s=60
    ) as gw:
        _tenant, _key, plain = gw.new_tenant()
        of_app(gw.app).pool.workers[1].inflight = 5  # least loaded picks w-slow first
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
        assert_openai_error(r, 502, type="api_error", code="upstream_error")
        assert len(slow.completion_requests()) == 1 and free.completion_requests() == []


async def test_a_single_worker_s_503_reaches_the_client_as_an_openai_error(
    tmp_path: Path, fake_factory: FakeFactory
) -> None:
    only = await fake_factory()
    only.behave(status=503, error_body={"error": "overloaded"})
    async with run_gateway(tmp_path / "gw", [(MODEL, "w-only", only.url)], health_interval_s=60) as gw:
        tenant, _key, plain = gw.new_tenant()
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
        err = assert_openai_error(r, 502, type="api_error", code="upstream_error")
        assert "HTTP 503" in err["message"] and "overloaded" not in r.text  # our words, not the worker's
        out = await stream_raw(gw.http, plain, chat_body(stream=True))
        assert out.status == 502 and out.events[0]["error"]["code"] == "upstream_error"
        assert len(only.completion_requests()) == 2  # once each, never retried on the same worker
        events = gw.events_for(tenant.id)
        assert [(e.event.outcome, e.event.worker_id) for e in events] == [
            (Outcome.UPSTREAM_ERROR, "w-only")
        ] * 2
        assert all(e.event.prompt_tokens == e.event.completion_tokens == 0 for e in events)


async def test_two_workers_answering_503_are_tried_once_each(
    tmp_path: Path, fake_factory: FakeFactory
) -> None:
    fakes = [await fake_factory() for _ in range(3)]
    for f in fakes:
        f.behave(status=503, error_body={"error": "overloaded"})
    async with run_gateway(
        tmp_path / "gw", [(MODEL, f"w{i}", f.url) for i, f in enumerate(fakes)], health_interval_s=60
    ) as gw:
        tenant, _key, plain = gw.new_tenant()
        r = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=auth(plain))
        assert_openai_error(r, 502, code="upstream_error")
        assert sorted(len(f.completion_requests()) for f in fakes) == [0, 1, 1]  # one retry, no more
        [ev] = gw.events_for(tenant.id)
        assert ev.event.outcome is Outcome.UPSTREAM_ERROR


async def test_a_failure_after_the_first_byte_is_not_retried(
    tmp_path: Path, fake_factory: FakeFactory
) -> None:
    dying, other = await fake_factory(), await fake_factory()
    dying.behave(tokens=10, die_after=4)
    async with run_gateway(
        tmp_path / "gw", [(MODEL, "w-dying", dying.url), (MODEL, "w-other", other.url)], health_interval_s=60
    ) as gw:
        tenant, _key, plain = gw.new_tenant()
        of_app(gw.app).pool.workers[1].inflight = 5  # least loaded picks w-dying
        out = await stream_raw(gw.http, plain, chat_body(stream=True, stream_options={"include_usage": True}))
        assert out.status == 200 and not out.done
        err = out.events[-1]["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "upstream_error"
        assert other.completion_requests() == []  # never generated twice
        await gw.wait_event(out.request_id)
        [ev] = gw.events_for(tenant.id)
        assert ev.event.outcome is Outcome.UPSTREAM_ERROR and ev.event.worker_id == "w-dying"
        assert (ev.event.prompt_tokens, ev.event.completion_tokens) == (31, 3)  # what it produced


# --- session affinity ----------------------------------------------------------------------------------
async def test_a_session_header_keeps_a_session_on_one_worker_and_reaches_it(
    tmp_path: Path, fake_factory: FakeFactory
) -> None:
    fakes = [await fake_factory() for _ in range(3)]
    async with run_gateway(
        tmp_path / "gw",
        [(MODEL, f"w{i}", f.url) for i, f in enumerate(fakes)],
        health_interval_s=60,
        gateway={"routing": "prefix_affinity"},
    ) as gw:
        _tenant, _key, plain = gw.new_tenant()
        sessions = [f"s-{i}" for i in range(6)]
        for turn in range(3):
            for session in sessions:
                r = await gw.http.post(
                    "/v1/chat/completions",
                    # the prompt changes every turn and the user is the same: only the header keeps it
                    json=chat_body(f"turn {turn} of {session}", user="same-user"),
                    headers=auth(plain, **{"X-Session-Id": session}),
                )
                assert r.status_code == 200
        owners: dict[str, set[int]] = {}
        for i, f in enumerate(fakes):
            for req in f.completion_requests():
                owners.setdefault(req.headers["x-session-id"], set()).add(i)  # passed on to the worker
        assert sorted(owners) == sessions
        assert all(len(ws) == 1 for ws in owners.values()), owners  # each session stayed on one worker
        assert len(set().union(*owners.values())) >= 2, owners  # and sessions spread over the workers
        # without the header, the same user is one session
        for f in fakes:
            f.reset()
        for turn in range(3):
            body = chat_body(f"turn {turn}", user="same-user")
            r = await gw.http.post("/v1/chat/completions", json=body, headers=auth(plain))
            assert r.status_code == 200
        served = [len(f.completion_requests()) for f in fakes]
        assert sorted(served) == [0, 0, 3]
        assert not any("x-session-id" in r.headers for f in fakes for r in f.completion_requests())


# --- the workers file through the gateway --------------------------------------------------------------
async def test_workers_file_metrics_refused_edits_states_and_a_drained_worker_s_series(
    tmp_path: Path, fake_factory: FakeFactory
) -> None:
    a, b = await fake_factory(), await fake_factory()
    wfile = tmp_path / "workers.yaml"
    write_workers(wfile, {"model": MODEL, "base_url": b.url, "id": "file-b"})
    env = {"TOKENPORT_WORKERS__FILE": str(wfile), "TOKENPORT_WORKERS__REFRESH_S": "0.1"}
    async with guarded_gateway(tmp_path / "gw", [(MODEL, "static-a", a.url)], env=env) as gw:
        pool = of_app(gw.app).pool
        await until(lambda: any(w.id == "file-b" and w.healthy for w in pool.workers))
        text = await gw.metrics()
        assert metric(text, "tokenport_workers", model=MODEL, state="active") == 2
        assert metric(text, "tokenport_worker_healthy", worker="file-b") == 1

        write_workers(wfile, {"model": MODEL, "base_url": b.url, "id": "file-b", "colour": "red"})
        for _ in range(100):
            text = await gw.metrics()
            if metric(text, "tokenport_worker_discovery_errors_total", source="workers_file"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # more refreshes: the same refused edit is counted once
        text = await gw.metrics()
        assert metric(text, "tokenport_worker_discovery_errors_total", source="workers_file") == 1
        assert any(w.id == "file-b" and not w.draining for w in pool.workers)  # the last good set stays

        write_workers(wfile)  # b leaves; nothing in flight: it drains at once and its series go
        await until(lambda: not any(w.id == "file-b" for w in pool.workers))
        await asyncio.sleep(0.3)  # a refresh after the sweep counts it
        text = await gw.metrics()
        assert 'worker="file-b"' not in text
        assert metric(text, "tokenport_worker_healthy", worker="static-a") == 1
        assert metric(text, "tokenport_workers", model=MODEL, state="active") == 1
        assert metric(text, "tokenport_workers", model=MODEL, state="draining") == 0


# --- a bad workers file at start -----------------------------------------------------------------------
def _config_with_workers_file(directory: Path, worker_url: str, entries: str | None) -> Path:
    cfg = write_config(directory, [(MODEL, "w0", worker_url)], health_interval_s=1)
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    raw["workers"]["file"] = "workers.yaml"  # relative to the config folder
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    if entries is not None:
        (directory / "workers.yaml").write_text(entries, encoding="utf-8")
    return cfg


BAD = f"workers:\n  - {{model: {MODEL}, base_url: 'http://127.0.0.1:9', colour: red}}\n"


def test_a_bad_workers_file_stops_create_app_naming_the_file_and_field(tmp_path: Path) -> None:
    cfg = _config_with_workers_file(tmp_path / "bad", "http://127.0.0.1:9", BAD)
    with pytest.raises(ConfigError) as info:
        create_app(load_settings(config_file=cfg))
    text = str(info.value)
    assert text.startswith("workers.file: ") and str(tmp_path / "bad" / "workers.yaml") in text
    assert "workers.0.colour" in text, text
    missing = _config_with_workers_file(tmp_path / "missing", "http://127.0.0.1:9", None)
    with pytest.raises(ConfigError, match="cannot read the workers file"):
        create_app(load_settings(config_file=missing))
    dup = _config_with_workers_file(
        tmp_path / "dup",
        "http://127.0.0.1:9",
        f"workers:\n  - {{model: {MODEL}, base_url: 'http://a:1', id: x}}\n"
        f"  - {{model: {MODEL}, base_url: 'http://b:1', id: x}}\n",
    )
    with pytest.raises(ConfigError, match=r"workers\.1\.id: 'x' is given twice"):
        create_app(load_settings(config_file=dup))


def test_the_cli_gateway_with_a_bad_workers_file_exits_2_without_a_traceback(tmp_path: Path) -> None:
    cfg = _config_with_workers_file(tmp_path, "http://127.0.0.1:9", BAD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENPORT_CONFIG": str(cfg)}
    env.pop("TOKENPORT_DATA_DIR", None)
    argv = [sys.executable, "-c", "from serving.cli import main; main()", "gateway", "--port", "0"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    said = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, said
    assert "configuration error" in said and "workers.0.colour" in said and "workers.yaml" in said
    assert "Traceback" not in said


def test_a_router_in_the_catalogue_is_a_router_worker(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [(MODEL, "rt", "http://127.0.0.1:9")], health_interval_s=1)
    catalogue = yaml.safe_load((tmp_path / "models.yaml").read_text(encoding="utf-8"))
    catalogue["models"][0]["workers"][0].update(router=True, health_path="/ready")
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(catalogue), encoding="utf-8")
    [w] = build_workers(load_settings(config_file=cfg))
    assert (w.id, w.router, w.health_path) == ("rt", True, "/ready")
