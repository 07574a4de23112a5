"""Metering under faults, against a real vLLM worker and `tokenport gateway` processes.

After each fault every response a client received in full is in the ledger exactly once, the hash
chain verifies, and `tokenport reconcile` (since a snapshot taken at a quiet moment before the test)
reports zero drift apart from the documented cut-off policy: a request cut off (by its client, a
worker failure, or a gateway crash) is billed what the worker had reported when it was cut off, so
the worker's counters may be ahead by the tokens still in flight at that moment.

- clients that disconnect after N chunks: client_cancelled, the worker stops generating at once;
- SIGTERM: in-flight streams finish, their events are committed, the process exits cleanly;
- SIGKILL of the gateway during mixed load, then a restart on the same ledger;
- PostgreSQL stopped and started under load (events spooled, then replayed), and fail-closed mode;
- a worker killed mid-stream: an SSE error event, upstream_error with the tokens it did produce.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from metering.db import make_engine
from metering.events import Outcome
from metering.reconcile import parse_worker_metrics
from metering.schema import usage_events
from metering.store_sql import UsageStore
from metering.tenants import TenantStore
from serving.settings import DEFAULT_SECRET, load_settings
from serving.workers.supervisor import worker_command
from tests import pg
from tests.integration.conftest import BIN, MODEL, REPO, free_port, reliability, stop, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
PROMPT = [{"role": "user", "content": "Count slowly from one to two hundred, one number per line."}]


# --- helpers -----------------------------------------------------------------------------------------
@dataclass
class GatewayProc:
    """`tokenport gateway` as a user starts it, restartable on the same data dir and database."""

    data: Path
    workers: list[str]
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    engines: list[Engine] = field(
        default_factory=list
    )  # the test's own reads of the ledger, disposed on close

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TOKENPORT_DATA_DIR": str(self.data),
            "TOKENPORT_CONFIG": str(REPO / "configs" / "tokenport.yaml"),
            "TOKENPORT_GATEWAY__METRICS_PORT": "0",  # several gateways on one host
            "TOKENPORT_GATEWAY__TRUSTED_PROXIES": '["127.0.0.1/32", "::1/128"]',
            **self.env_extra,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return self.env_extra.get("TOKENPORT_DATABASE_URL", f"sqlite:///{self.data / 'tokenport.db'}")

    def worker_args(self) -> list[str]:
        return [a for w in self.workers for a in ("--worker", f"{MODEL}={w}")]

    def start(self) -> GatewayProc:
        self.data.mkdir(parents=True, exist_ok=True)
        log = open(self.data / "gateway.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(BIN / "tokenport"), "gateway", "--port", str(self.port), *self.worker_args()],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        wait_http(self.url + "/healthz", 60, self.proc, self.data / "gateway.log")
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        for engine in self.engines:
            engine.dispose()
        self.engines.clear()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "tokenport"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def reconcile(self, *args: str) -> tuple[int, dict[str, Any]]:
        out = self.cli(
            "reconcile", *self.worker_args(), "--max-drift-ratio", "0", "--json", *args, check=False
        )
        assert out.stdout, out.stderr
        return out.returncode, json.loads(out.stdout)

    def store(self) -> UsageStore:
        engine = make_engine(self.db_url)
        self.engines.append(engine)
        return UsageStore(engine)

    def new_key(self, tenant_id: str) -> str:
        engine = make_engine(self.db_url)
        tenants = TenantStore(engine, DEFAULT_SECRET)
        if tenants.get_tenant(tenant_id) is None:
            tenants.create_tenant(id=tenant_id, name=tenant_id, billing_country="KZ", business=True)
        _key, plaintext = tenants.create_key(tenant_id)
        engine.dispose()
        return plaintext


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[GatewayProc]]:
    started: list[GatewayProc] = []
    yield started
    for g in started:
        g.close()


def counters(worker_url: str) -> tuple[tuple[int, int, int], float]:
    text = httpx.get(worker_url + "/metrics", timeout=10).text
    c, _ = parse_worker_metrics(text, MODEL)
    running = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running{")
    )
    return (c.prompt_tokens, c.cached_prompt_tokens, c.completion_tokens), running


def quiet(worker_url: str, timeout: float = 30) -> None:
    """Wait until the worker runs nothing and its counters have settled."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        c, running = counters(worker_url)
        if running == 0 and c == last:
            return
        last = c
        time.sleep(0.5)
    raise AssertionError("the worker did not become quiet")


def snapshot(gw: GatewayProc) -> str:
    """A reconcile baseline at a quiet moment; returns the `--since` value that selects it."""
    quiet(gw.workers[0])
    code, _report = gw.reconcile()
    assert code in (0, 1)  # the shared worker has also served other ledgers: drift since its start
    time.sleep(0.05)
    return datetime.now(UTC).isoformat()


def assert_reconciled(gw: GatewayProc, since: str, *, in_flight_tokens: int = 0) -> dict[str, Any]:
    """Zero drift since the snapshot, except what the cut-off policy explains."""
    quiet(gw.workers[0])
    code, report = gw.reconcile(
        "--since", since, "--no-snapshot", "--max-drift-tokens", str(in_flight_tokens)
    )
    rows = {r["token_type"]: r for r in report["rows"] if r["worker"] == "cli-0"}
    assert all("snapshot" in b["baseline"] for b in report["baselines"] if b["worker"] == "cli-0"), report
    assert code == 0, report
    if not in_flight_tokens:
        assert rows["input"]["drift"] == 0 and rows["cached_input"]["drift"] == 0, rows
    assert rows["output"]["drift"] <= 0, rows  # never more billed than the worker generated
    return rows


def ledger_counts(store: UsageStore, request_ids: list[str]) -> dict[str, int]:
    with store._engine.connect() as conn:
        rows = conn.execute(
            select(usage_events.c.request_id, func.count())
            .where(usage_events.c.request_id.in_(request_ids))
            .group_by(usage_events.c.request_id)
        ).all()
    return {r: n for r, n in rows}


def ledger_faults(store: UsageStore, request_ids: list[str]) -> tuple[int, int]:
    """(lost, doubled): fully received responses missing from the ledger, and request ids stored twice."""
    counts = ledger_counts(store, request_ids)
    lost = sum(1 for r in request_ids if r not in counts)
    all_ids = [s.event.request_id for s in store.iter_events()]
    return lost, len(all_ids) - len(set(all_ids))


def assert_each_once(store: UsageStore, request_ids: list[str]) -> None:
    counts = ledger_counts(store, request_ids)
    missing = [r for r in request_ids if r not in counts]
    assert not missing, f"{len(missing)} fully received responses are not in the ledger: {missing[:3]}"
    assert all(n == 1 for n in counts.values())
    all_ids = [s.event.request_id for s in store.iter_events()]
    assert len(all_ids) == len(set(all_ids)), "duplicate request ids in the ledger"


def verify_chain(gw: GatewayProc) -> None:
    out = gw.cli("usage", "verify", "--json", check=False)
    assert out.returncode == 0 and json.loads(out.stdout)["ok"], out.stdout + out.stderr


@dataclass
class Load:
    """Fully received responses (non-streamed 200, or a stream that reached [DONE]) and the rest."""

    complete: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    failed: int = 0
    server_errors: int = 0  # 5xx answers (not connections the killed gateway dropped)


async def one_request(client: httpx.AsyncClient, kind: str, load: Load, max_tokens: int = 24) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
    }
    try:
        if kind == "json":
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code >= 500:
                load.server_errors += 1
            if r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0:
                load.complete.append(r.headers["x-request-id"])
            else:
                load.failed += 1
            return
        body["stream"] = True
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            rid = resp.headers.get("x-request-id", "")
            if resp.status_code >= 500:
                load.server_errors += 1
            n = 0
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    load.complete.append(rid)
                    return
                if line.startswith("data: {"):
                    n += 1
                    if kind == "cut" and n >= 3:
                        load.cut.append(rid)
                        return
            load.failed += 1
    except httpx.ConnectError:
        load.failed += 1
        raise  # the gateway is gone: this client stops
    except httpx.HTTPError:
        load.failed += 1


async def run_load(
    gw: GatewayProc, key: str, seconds: float, concurrency: int = 4, during: Any = None
) -> Load:
    load = Load()
    kinds = ["stream", "json", "cut", "stream", "json"]
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(
        base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as c:

        async def loop(i: int) -> None:
            k = i
            while time.monotonic() < deadline:
                await one_request(c, kinds[k % len(kinds)], load)
                k += 1

        tasks = [asyncio.create_task(loop(i)) for i in range(concurrency)]
        if during is not None:
            await during()
        await asyncio.gather(*tasks, return_exceptions=True)
    return load


# --- the fault tests ---------------------------------------------------------------------------------
def test_clients_disconnecting_after_n_chunks(
    vllm_worker: str, tmp_path: Path, gateways: list[GatewayProc]
) -> None:
    gw = GatewayProc(tmp_path / "gw", [vllm_worker]).start()
    gateways.append(gw)
    key = gw.new_key("cut-co")
    since = snapshot(gw)
    cut: dict[str, int] = {}
    complete: list[str] = []
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        for n in (1, 2, 4, 8, 16):
            with c.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": PROMPT,
                    "max_tokens": 400,
                    "min_tokens": 400,
                    "stream": True,
                },
            ) as resp:
                seen = 0
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        seen += 1
                        if seen >= n:
                            break
                cut[resp.headers["x-request-id"]] = n
            t_closed = time.monotonic()
            while counters(vllm_worker)[1] > 0:  # the worker stops generating at once
                assert time.monotonic() - t_closed < 3.0, "the worker kept generating after the client left"
                time.sleep(0.05)
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 16})
        complete.append(r.headers["x-request-id"])
    store = gw.store()
    time.sleep(0.5)  # cut-off events are committed just after the connection closes
    for rid, n in cut.items():
        stored = store.get(rid)
        assert stored is not None, f"{rid} not metered"
        e = stored.event
        assert e.outcome is Outcome.CLIENT_CANCELLED and not e.estimated and e.prompt_tokens > 0
        # at least the tokens the client saw (the first chat chunk carries only the role), far from 400
        assert n - 1 <= e.completion_tokens < n + 40, (n, e.completion_tokens)
    lost, doubled = ledger_faults(store, complete + list(cut))
    reliability(
        "clients gone after 1-16 chunks",
        requests=len(cut) + len(complete),
        faults=len(cut),
        lost=lost,
        doubled=doubled,
    )
    assert_each_once(store, complete + list(cut))
    rows = assert_reconciled(gw, since)
    assert rows["output"]["cut_off_events"] == len(cut)
    verify_chain(gw)


def test_sigterm_drains_in_flight_streams(
    vllm_worker: str, tmp_path: Path, gateways: list[GatewayProc]
) -> None:
    gw = GatewayProc(tmp_path / "gw", [vllm_worker]).start()
    gateways.append(gw)
    key = gw.new_key("drain-co")
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 120, "min_tokens": 120, "stream": True}
    with (
        httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        rid = resp.headers["x-request-id"]
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        gw.signal(signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest, rest[-3:]
    assert gw.wait(30) == 0
    stored = gw.store().get(rid)
    reliability("SIGTERM with a stream in flight", requests=1, faults=1, lost=int(stored is None))
    assert stored is not None and stored.event.outcome is Outcome.OK and stored.event.completion_tokens == 120


def test_gateway_sigkill_under_mixed_load_then_restart(
    vllm_worker: str, tmp_path: Path, gateways: list[GatewayProc]
) -> None:
    gw = GatewayProc(tmp_path / "gw", [vllm_worker]).start()
    gateways.append(gw)
    key = gw.new_key("crash-co")
    since = snapshot(gw)

    async def kill_midway() -> None:
        await asyncio.sleep(3.0)
        gw.signal(signal.SIGKILL)

    load = asyncio.run(run_load(gw, key, seconds=6.0, concurrency=4, during=kill_midway))
    assert gw.wait(10) == -signal.SIGKILL
    assert load.complete, "no response completed before the kill"
    assert 0 < load.failed < 20  # the requests in flight, then each client finds the gateway gone
    gw.start()  # same data dir, same ledger
    after = asyncio.run(run_load(gw, key, seconds=1.5, concurrency=2))
    assert after.complete and not after.failed
    store = gw.store()
    lost, doubled = ledger_faults(store, load.complete + after.complete)
    sent = sum(len(x.complete) + len(x.cut) + x.failed for x in (load, after))
    reliability(
        "gateway SIGKILL under mixed load, restart",
        requests=sent,
        faults=1,
        lost=lost,
        doubled=doubled,
        server_errors=load.server_errors + after.server_errors,
    )
    assert_each_once(store, load.complete + after.complete)
    verify_chain(gw)
    # Requests in flight at the kill were never metered (no client received them in full): the worker
    # may be ahead by at most their prompt + max_tokens each (4 clients, about 60 prompt tokens).
    rows = assert_reconciled(gw, since, in_flight_tokens=4 * (60 + 24))
    assert rows["input"]["drift"] <= 0


def test_database_stopped_and_started(vllm_worker: str, tmp_path: Path, gateways: list[GatewayProc]) -> None:
    if not pg.available():
        pytest.skip("PostgreSQL binaries not installed (make test installs them)")
    server = pg.PgServer().start()
    try:
        gw = GatewayProc(tmp_path / "gw", [vllm_worker], {"TOKENPORT_DATABASE_URL": server.url}).start()
        gateways.append(gw)
        key = gw.new_key("pg-co")
        since = snapshot(gw)

        async def outage() -> None:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(2.0)  # requests keep being answered: their events go to the spool
            await asyncio.to_thread(server.start)

        load = asyncio.run(run_load(gw, key, seconds=5.0, concurrency=3, during=outage))
        assert load.complete and not load.failed, load
        spool = gw.data / "spool"
        deadline = time.monotonic() + 20
        while spool.exists() and any(spool.iterdir()):  # replayed once the database is back
            assert time.monotonic() < deadline, "the spool was not replayed"
            time.sleep(0.2)
        store = gw.store()
        lost, doubled = ledger_faults(store, load.complete)
        reliability(
            "PostgreSQL stopped 2 s under load (spool, replay)",
            faults=1,
            lost=lost,
            doubled=doubled,
            requests=len(load.complete) + len(load.cut) + load.failed,
            server_errors=load.server_errors,
        )
        assert_each_once(store, load.complete)
        verify_chain(gw)
        assert_reconciled(gw, since)
        gw.close()

        # fail closed: while the database is down, clients get 503 and no worker runs anything
        closed = GatewayProc(
            tmp_path / "gw-closed",
            [vllm_worker],
            {"TOKENPORT_DATABASE_URL": server.url, "TOKENPORT_METERING__FAIL_CLOSED": "true"},
        )
        closed.start()
        gateways.append(closed)
        with httpx.Client(base_url=closed.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            body = {"model": MODEL, "messages": PROMPT, "max_tokens": 8}
            assert c.post("/v1/chat/completions", json=body).status_code == 200
            server.stop()
            first = c.post("/v1/chat/completions", json=body)  # generated, but its event cannot be committed
            assert first.status_code == 503 and first.json()["error"]["code"] == "ledger_unavailable"
            before = counters(vllm_worker)[0]
            for stream in (False, True):
                r = c.post("/v1/chat/completions", json={**body, "stream": stream})
                assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
            assert counters(vllm_worker)[0] == before
            server.start()
            deadline = time.monotonic() + 10
            while c.post("/v1/chat/completions", json=body).status_code != 200:
                assert time.monotonic() < deadline, "did not recover after the database came back"
                time.sleep(0.5)
        assert not (closed.data / "spool").exists() or not any((closed.data / "spool").iterdir())
    finally:
        server.close()


@dataclass
class Victim:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module", autouse=True)
def victim_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    """A second vLLM worker of our own, to be killed (the session's worker is shared). Started when
    the module starts, so it warms up (eager mode: no compilation) while the other tests run."""
    settings = load_settings(REPO / "configs" / "tokenport.yaml", data_dir=REPO / "data")
    spec = settings.catalogue.get(MODEL)
    assert spec is not None
    spec = spec.model_copy(
        update={"max_model_len": 1024, "worker_args": [*spec.worker_args, "--enforce-eager"]}
    )
    port = free_port()
    cmd = worker_command(settings, spec, spec.workers[0].model_copy(update={"port": port}))
    log = tmp_path_factory.mktemp("victim") / "victim.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **settings.workers.env},
            start_new_session=True,
        )
    try:
        yield Victim(f"http://127.0.0.1:{port}", proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_worker_killed_mid_stream(
    vllm_worker: str, victim_worker: Victim, tmp_path: Path, gateways: list[GatewayProc]
) -> None:
    wait_http(victim_worker.url + "/health", 600, victim_worker.proc, victim_worker.log)
    victim_url, victim = victim_worker.url, victim_worker.proc
    # cli-0 is the victim (picked first when idle), cli-1 the session's worker
    gw = GatewayProc(tmp_path / "gw", [victim_url, vllm_worker]).start()
    gateways.append(gw)
    key = gw.new_key("kill-co")
    seen = 0
    events: list[dict[str, Any]] = []
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": PROMPT,
                "max_tokens": 400,
                "min_tokens": 400,
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            },
        ) as resp:
            rid = resp.headers["x-request-id"]
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    seen += 1
                    if seen == 6:
                        os.killpg(victim.pid, signal.SIGKILL)  # the worker dies mid-stream
            assert line != "data: [DONE]"
        last_usage = max(e["usage"]["completion_tokens"] for e in events if e.get("usage"))
        assert "error" in events[-1] and events[-1]["error"]["code"] == "upstream_error"
        stored = gw.store().get(rid)
        assert stored is not None
        e = stored.event
        assert e.outcome is Outcome.UPSTREAM_ERROR and e.worker_id == "cli-0"
        assert e.completion_tokens >= last_usage > 0 and e.completion_tokens < 400 and e.prompt_tokens > 0
        # the gateway stays up and serves the next request from the other worker
        assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 8})
        assert r.status_code == 200
        assert gw.store().get(r.headers["x-request-id"]).event.worker_id == "cli-1"  # type: ignore[union-attr]
    code, report = gw.reconcile("--no-snapshot")
    assert code != 0 and "cli-0" in report["unreachable"]  # a dead worker's counters died with it
    reliability(
        "worker killed mid-stream (SIGKILL)",
        requests=2,
        faults=1,
        lost=sum(1 for r in (rid, r.headers["x-request-id"]) if gw.store().get(r) is None),
    )
    verify_chain(gw)
