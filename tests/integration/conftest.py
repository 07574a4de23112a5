"""Real parts: one vLLM worker with the default model for the whole session, and the gateway
started with the `tokenport` command exactly as a user would, each on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.settings import load_settings
from serving.workers.prepare import is_prepared
from serving.workers.supervisor import worker_command

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


def start_gateway(port: int, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`tokenport gateway --port PORT ARGS...` with `env`, its output in `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [str(BIN / "tokenport"), "gateway", "--port", str(port), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def vllm_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM worker serving the default model (prepared by `make test` into ./data)."""
    settings = load_settings(REPO / "configs" / "tokenport.yaml", data_dir=REPO / "data")
    spec = settings.catalogue.get(MODEL)
    assert spec is not None
    if not is_prepared(settings.models_dir, spec):
        pytest.fail("the default model is not prepared: run `make test` (or `tokenport models prepare`)")
    port = free_port()
    worker = spec.workers[0].model_copy(update={"port": port})
    cmd = worker_command(settings, spec, worker)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {**os.environ, **settings.workers.env}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 900, proc, log)
        yield url
    finally:
        stop(proc)


# The tests send X-Client-Country from loopback: trusting it is explicit (the default trusts no proxy).
TRUSTED_LOOPBACK = '["127.0.0.1/32", "::1/128"]'


@dataclass
class Gateway:
    url: str
    data_dir: Path
    env: dict[str, str]
    worker_url: str
    metrics_url: str = ""  # the gateway's metrics listener (GET /metrics is not on the public port)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "tokenport"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )

    def cli_json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)


@pytest.fixture(scope="session")
def gateway(vllm_worker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gateway-data")
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "TOKENPORT_DATA_DIR": str(data),
        "TOKENPORT_CONFIG": str(REPO / "configs" / "tokenport.yaml"),
        "TOKENPORT_GATEWAY__METRICS_PORT": str(metrics_port),
        "TOKENPORT_GATEWAY__TRUSTED_PROXIES": TRUSTED_LOOPBACK,
    }
    log = data / "gateway.log"
    proc = start_gateway(port, env, log, "--worker", f"{MODEL}={vllm_worker}")
    try:
        wait_http(
            f"http://127.0.0.1:{port}/healthz", 60, proc, log
        )  # readyz wants every catalogued model (the embed worker is not started here)
        yield Gateway(
            url=f"http://127.0.0.1:{port}",
            data_dir=data,
            env=env,
            worker_url=vllm_worker,
            metrics_url=f"http://127.0.0.1:{metrics_port}",
        )
    finally:
        stop(proc)


# --- reliability figures -----------------------------------------------------------------------------
# Each fault scenario (tests/integration/test_faults.py, test_money_attacks.py) reports what it sent,
# which faults it injected and what it found in the ledger; the run prints one table at the end
# (the README's Reliability section quotes it). Counted, never assumed: a scenario asserts the
# zeros after it has reported them.
RELIABILITY: list[dict[str, object]] = []


def reliability(
    scenario: str,
    *,
    requests: int,
    faults: int,
    lost: int = 0,
    doubled: int = 0,
    overspend: int = 0,
    server_errors: int = 0,
) -> None:
    RELIABILITY.append(
        {
            "scenario": scenario,
            "requests": requests,
            "faults": faults,
            "lost": lost,
            "doubled": doubled,
            "overspend": overspend,
            "5xx": server_errors,
        }
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RELIABILITY:
        return
    cols = ("scenario", "requests", "faults", "lost", "doubled", "overspend", "5xx")
    terminalreporter.section("reliability figures (fault suite)")
    terminalreporter.line(" | ".join(cols))
    for row in RELIABILITY:
        terminalreporter.line(" | ".join(str(row[c]) for c in cols))
    total = {c: sum(int(str(r[c])) for r in RELIABILITY) for c in cols[1:]}
    terminalreporter.line(" | ".join(["total", *(str(total[c]) for c in cols[1:])]))
