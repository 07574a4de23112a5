"""Every PromQL expression of every dashboard panel, run against a real Prometheus that scraped a real
gateway and a real vLLM worker after traffic from two tenants in two countries: each must be valid
and return data. The alert and recording rules shipped in configs/prometheus are loaded too."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.dashboard_queries import iter_dashboard_queries
from tests.integration.conftest import BIN, MODEL, REPO, free_port, stop, wait_http

pytestmark = pytest.mark.integration
DASHBOARDS = REPO / "configs" / "grafana" / "dashboards"
RULES = REPO / "configs" / "prometheus" / "rules"
TENANTS = {"dash-a": ("KZ", "USD"), "dash-b": ("SA", "CNY")}


@pytest.fixture(scope="module")
def stack(vllm_worker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (make test installs it via .ci/system-deps.sh)")
    tmp = tmp_path_factory.mktemp("dash")
    # The gateway reconciles against its workers every 2 s here, so the drift panels have data.
    env = {
        "PATH": str(BIN) + ":/usr/bin:/bin",
        "TOKENPORT_DATA_DIR": str(tmp / "data"),
        "TOKENPORT_CONFIG": str(REPO / "configs" / "tokenport.yaml"),
        "HOME": str(tmp),
        "TOKENPORT_METERING__RECONCILE_INTERVAL_S": "2",
    }
    keys = {}
    for tid, (country, currency) in TENANTS.items():
        subprocess.run(
            [
                str(BIN / "tokenport"),
                "tenants",
                "create",
                "--id",
                tid,
                "--name",
                tid.upper(),
                "--billing-country",
                country,
                "--currency",
                currency,
                "--json",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        out = subprocess.run(
            [str(BIN / "tokenport"), "keys", "create", "--tenant", tid, "--json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        keys[tid] = yaml.safe_load(out.stdout)["key"]
        # A monthly token budget, so the budget panel and TenantNearBudget have a series.
        subprocess.run(
            [
                str(BIN / "tokenport"),
                "tenants",
                "set-limits",
                tid,
                "--budget",
                "1000000",
                "--budget-unit",
                "tokens",
                "--budget-period",
                "month",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    gw_port, prom_port, dead_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    env["TOKENPORT_GATEWAY__METRICS_PORT"] = str(metrics_port)  # Prometheus scrapes the metrics listener
    env["TOKENPORT_GATEWAY__TRUSTED_PROXIES"] = '["127.0.0.1/32", "::1/128"]'  # the traffic sets its country
    gw_log = tmp / "gateway.log"
    with open(gw_log, "wb") as f:
        gw = subprocess.Popen(
            [
                str(BIN / "tokenport"),
                "gateway",
                "--port",
                str(gw_port),
                "--worker",
                f"{MODEL}={vllm_worker}",
                "--worker",
                f"ghost-model=http://127.0.0.1:{dead_port}",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    worker_target = vllm_worker.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "recording.yml"), str(RULES / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "tokenport-gateway", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            {"job_name": "vllm-workers", "static_configs": [{"targets": [worker_target]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_log = tmp / "prometheus.log"
    with open(prom_log, "wb") as f:
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{gw_port}/healthz", 60, gw, gw_log)
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready", 60, prom, prom_log)
        yield {
            "gateway": f"http://127.0.0.1:{gw_port}",
            "prometheus": f"http://127.0.0.1:{prom_port}",
            "keys": keys,
            "env": env,
        }
    finally:
        stop(prom)
        stop(gw)


def traffic(gateway: str, keys: dict[str, str]) -> None:
    long_prompt = "Summarise the customs rules for exporting software services from Tianjin. " * 40
    for _tid, key in keys.items():
        for country in ("UZ", "TR"):
            c = openai.OpenAI(
                base_url=gateway + "/v1",
                api_key=key,
                max_retries=0,
                default_headers={"X-Client-Country": country},
            )
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Привет, как дела?"}], max_tokens=6
            )
            for _chunk in c.chat.completions.create(
                model=MODEL,
                stream=True,
                max_tokens=6,
                messages=[{"role": "user", "content": "Hello there, friend"}],
            ):
                pass
            for _ in range(2):  # the second one is served from the prefix cache: cached_input tokens
                c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
            with pytest.raises(openai.BadRequestError):  # refused by the worker: outcome "rejected"
                c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=100_000
                )
            with pytest.raises(openai.InternalServerError):  # 503: no healthy worker for that model
                c.chat.completions.create(model="ghost-model", messages=[{"role": "user", "content": "x"}])
            c.close()


def query(prom: str, expr: str) -> dict[str, Any]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"invalid PromQL ({r.status_code}): {expr}\n{r.text}"
    body: dict[str, Any] = r.json()
    return body


def test_every_dashboard_query_returns_data(stack: dict[str, Any]) -> None:
    traffic(stack["gateway"], stack["keys"])
    subprocess.run(
        [str(BIN / "tokenport"), "usage", "summary", "--json"],
        env=stack["env"],
        check=True,
        capture_output=True,
    )
    queries = iter_dashboard_queries(DASHBOARDS, {"tenant": "dash-a"})
    assert len(queries) > 40
    prom = stack["prometheus"]
    # Scrapes every second; wait until the slowest series (rate over recording rules) has data.
    deadline = time.monotonic() + 90
    missing: list[str] = []
    while time.monotonic() < deadline:
        missing = [f"{q[0]} / {q[1]}: {q[2]}" for q in queries if not query(prom, q[2])["data"]["result"]]
        if not missing:
            break
        time.sleep(3)
    assert not missing, "panels without data:\n" + "\n".join(missing)
    # The exports dashboard saw both origin countries and the cached-input token type.
    countries = {
        r["metric"]["origin_country"]
        for r in query(prom, "sum by (origin_country) (tokenport_tokens_total)")["data"]["result"]
    }
    assert {"UZ", "TR"} <= countries
    cached = query(prom, 'sum(tokenport_tokens_total{token_type="cached_input"})')["data"]["result"]
    assert float(cached[0]["value"][1]) > 0


def test_alert_rules_loaded(stack: dict[str, Any]) -> None:
    r = httpx.get(stack["prometheus"] + "/api/v1/rules", timeout=10).json()
    names = {rule["name"] for g in r["data"]["groups"] for rule in g["rules"]}
    assert {
        "WorkerDown",
        "GatewayErrorRate",
        "UsageChunkMissing",
        "MeteringDrift",
        "TenantNearBudget",
        "LabelCardinalityNearCap",
    } <= names
    health = {rule["name"]: rule["health"] for g in r["data"]["groups"] for rule in g["rules"]}
    assert all(h in ("ok", "unknown") for h in health.values()), health
