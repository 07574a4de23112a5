"""`tokenport gateway --processes 2`: two real gateway processes on one port (SO_REUSEPORT), each with
its metrics on metrics_port + i, one SQLite ledger, one rate limit in a real Redis; SIGTERM stops
both. Without a shared limits backend it is refused. Against the fake worker (the real-worker figures
are in bench/)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from metering.db import make_engine
from metering.store_sql import UsageStore
from tests import redis_fixture
from tests.conftest import MODEL, metric
from tests.fakes import FakeWorker, free_port, free_port_run
from tests.redis_fixture import RedisServer

redis_server = redis_fixture.redis_server  # the fixture, for this module

REPO = Path(__file__).resolve().parents[2]


def cli(env: dict[str, str], *args: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", "from serving.cli import main; main()", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return dict(json.loads(out.stdout))


async def _ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(300):
            assert proc.returncode is None, "the gateway exited"
            try:
                if (await c.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def test_processes_without_a_shared_limits_backend_are_refused(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENPORT_DATA_DIR": str(tmp_path)}
    argv = [sys.executable, "-c", "from serving.cli import main; main()", "gateway", "--processes", "2"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "limits.backend: redis" in " ".join(out.stdout.split())


@pytest.mark.parametrize("processes", [1, 3])
def test_a_taken_metrics_port_is_refused_before_start_with_the_setting_to_change(
    tmp_path: Path, processes: int
) -> None:
    first = free_port_run(3)
    taken = first + processes - 1  # the last process's metrics port
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOKENPORT_DATA_DIR": str(tmp_path),
        "TOKENPORT_GATEWAY__METRICS_PORT": str(first),
    }
    argv = [sys.executable, "-c", "from serving.cli import main; main()", "gateway"]
    argv += ["--port", str(free_port()), "--processes", str(processes), "--per-process-limits"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    said = " ".join(out.stdout.split())
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"127.0.0.1:{taken} cannot be used" in said and "TOKENPORT_GATEWAY__METRICS_PORT" in said
    assert ("gateway.metrics_port + 2" in said) == (processes == 3)
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("metrics", "port", "said"), [(65534, 8000, "go past 65535"), (9000, 9001, "port 9001")]
)
def test_metrics_ports_past_65535_or_over_the_gateway_s_port_are_refused(
    tmp_path: Path, metrics: int, port: int, said: str
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOKENPORT_DATA_DIR": str(tmp_path),
        "TOKENPORT_GATEWAY__METRICS_PORT": str(metrics),
    }
    argv = [sys.executable, "-c", "from serving.cli import main; main()", "gateway", "--port", str(port)]
    argv += ["--processes", "3", "--per-process-limits"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert said in " ".join(out.stdout.split()) and "Traceback" not in out.stderr


async def test_two_processes_share_one_port_one_ledger_and_one_rate_limit(
    tmp_path: Path, worker: FakeWorker, redis_server: RedisServer
) -> None:
    port, metrics = free_port(), free_port_run(2)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TOKENPORT_DATA_DIR": str(tmp_path),
        "TOKENPORT_CONFIG": str(REPO / "configs" / "tokenport.yaml"),
        "TOKENPORT_GATEWAY__METRICS_PORT": str(metrics),
        "TOKENPORT_LIMITS__BACKEND": "redis",
        "TOKENPORT_LIMITS__REDIS_URL": redis_server.url,
    }
    cli(env, "tenants", "create", "--id", "mp", "--name", "MP LLP", "--billing-country", "KZ")
    cli(env, "tenants", "set-limits", "mp", "--rpm", "25")
    key = cli(env, "keys", "create", "--tenant", "mp")["key"]
    worker.behave(tokens=3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from serving.cli import main; main()",
        "gateway",
        "--port",
        str(port),
        "--processes",
        "2",
        "--worker",
        f"{MODEL}={worker.url}",
        env=env,
        start_new_session=True,
    )
    try:
        for i in range(2):
            await _ready(f"http://127.0.0.1:{metrics + i}/metrics", proc)
        await _ready(
            f"http://127.0.0.1:{port}/healthz", proc
        )  # readyz also wants the catalogue's embed worker
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        statuses = []
        for _ in range(40):  # a new connection each: the kernel spreads them over the two processes
            async with httpx.AsyncClient() as c:
                r = await c.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert r.status_code in (200, 429), r.text
                statuses.append(r.status_code)
        served = statuses.count(200)
        # 25 a minute shared through Redis (plus what refills in the few seconds this takes); two
        # processes counting their own would let all 40 through
        assert 25 <= served <= 28, statuses
        counts = []
        async with httpx.AsyncClient() as c:
            for i in range(2):
                text = (await c.get(f"http://127.0.0.1:{metrics + i}/metrics")).text
                counts.append(metric(text, "tokenport_requests_total", tenant="mp"))
        assert sum(counts) == served and min(counts) > 0, counts  # both served, each counted once
        store = UsageStore(make_engine(f"sqlite:///{tmp_path / 'tokenport.db'}"))
        for _ in range(50):
            if len(list(store.iter_events(tenant_id="mp"))) == served:
                break
            await asyncio.sleep(0.1)
        events = list(store.iter_events(tenant_id="mp"))
        assert len(events) == served and len({e.event.request_id for e in events}) == served  # one ledger
        assert [e.tenant_seq for e in events] == list(range(1, served + 1))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0
