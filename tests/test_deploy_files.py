"""Prometheus config and rules, compose.yaml, Dockerfile and .dockerignore.

Tools, and what happens without them:
- promtool (Debian package `prometheus`): the promtool tests skip, saying so.
- compose: `docker compose` (the v2 plugin) if it works, else `docker-compose` (Debian package
  `docker-compose`); the compose CLI tests skip if neither is there. The structural checks of
  compose.yaml below always run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

try:  # tests/ is a package once it gets an __init__.py; until then it is on sys.path itself.
    from tests.dashboard_queries import METRIC_NAMES, metric_names_in
except ImportError:
    from dashboard_queries import METRIC_NAMES, metric_names_in  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "configs" / "prometheus"
RULES = PROMETHEUS / "rules"
ALERT_NAMES = {
    "WorkerDown",
    "GatewayErrorRate",
    "UsageChunkMissing",
    "MeteringDrift",
    "TenantNearBudget",
    "LabelCardinalityNearCap",
}
WORKER_FLAGS = ("--enable-force-include-usage", "--enable-prompt-tokens-details")
DUMMY_ENV = {
    "TOKENPORT_SECRET_KEY": "test-secret-key",
    "TOKENPORT_ADMIN_TOKEN": "test-admin-token",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)


# ------------------------------------------------------------------ promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return binary


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_check_config(promtool: str, config: str) -> None:
    result = run([promtool, "check", "config", str(PROMETHEUS / config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES / "recording.yml"), str(RULES / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests_pass(promtool: str) -> None:
    result = run([promtool, "test", "rules", str(RULES / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: raise TenantNearBudget's threshold and they must."""
    shutil.copytree(RULES, tmp_path / "rules")
    alerts = tmp_path / "rules" / "alerts.yml"
    text = alerts.read_text()
    assert "tokenport_budget_used_ratio > 0.9" in text
    alerts.write_text(text.replace("tokenport_budget_used_ratio > 0.9", "tokenport_budget_used_ratio > 0.99"))
    result = run([promtool, "test", "rules", str(tmp_path / "rules" / "alerts_test.yml")])
    assert result.returncode != 0
    assert "TenantNearBudget" in result.stdout + result.stderr


# ------------------------------------------------------------------ Prometheus files


@pytest.mark.parametrize(
    "config, gateway, worker",
    [
        ("prometheus.yml", "127.0.0.1:9464", "127.0.0.1:8100"),  # the gateway's metrics listener
        ("prometheus.compose.yml", "gateway:9464", "vllm:8000"),
    ],
)
def test_prometheus_config_jobs(config: str, gateway: str, worker: str) -> None:
    data = load_yaml(PROMETHEUS / config)
    assert data["global"]["scrape_interval"] == "15s"
    assert data["rule_files"] == ["rules/recording.yml", "rules/alerts.yml"]
    jobs = {job["job_name"]: job for job in data["scrape_configs"]}
    assert set(jobs) == {"tokenport-gateway", "vllm-workers"}
    assert jobs["tokenport-gateway"]["static_configs"][0]["targets"] == [gateway]
    assert jobs["vllm-workers"]["static_configs"][0]["targets"] == [worker]


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def test_alert_rules_have_names_severity_and_annotations() -> None:
    alerts = rules(RULES / "alerts.yml")
    assert {a["alert"] for a in alerts} == ALERT_NAMES
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert alert["annotations"]["summary"].strip(), alert["alert"]
        assert alert["annotations"]["description"].strip(), alert["alert"]
    worker_down = next(a for a in alerts if a["alert"] == "WorkerDown")
    assert worker_down["for"] == "1m"


def test_every_alert_has_a_firing_unit_test() -> None:
    fired = {
        case["alertname"]
        for test in load_yaml(RULES / "alerts_test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert fired == ALERT_NAMES


def test_rules_use_only_contract_metrics() -> None:
    recorded = {r["record"] for r in rules(RULES / "recording.yml")}
    for rule in rules(RULES / "recording.yml") + rules(RULES / "alerts.yml"):
        unknown = metric_names_in(rule["expr"]) - METRIC_NAMES - recorded
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"


# ------------------------------------------------------------------ compose.yaml: the CLI


def compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = run(["docker", "compose", "version"])
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    if shutil.which("docker") is None and shutil.which("docker-compose") is None:
        pytest.skip("no docker binary on this machine")
    command = compose_command()
    if command is None:
        pytest.skip(
            "docker is here but has no compose plugin, and docker-compose is not installed "
            "(Debian: apt-get install docker-compose)"
        )
    return command


def compose_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(DUMMY_ENV)
    env.update(overrides)
    return env


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_config_is_valid(compose: list[str], profile: str | None) -> None:
    profile_args = ["--profile", profile] if profile else []
    result = run([*compose, *profile_args, "config", "-q"], env=compose_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_refuses_to_start_without_the_gateway_secret(compose: list[str]) -> None:
    env = compose_env()
    del env["TOKENPORT_SECRET_KEY"]
    result = run([*compose, "config", "-q"], env=env)
    assert result.returncode != 0
    assert "TOKENPORT_SECRET_KEY" in result.stdout + result.stderr or "set it" in result.stderr


# ------------------------------------------------------------------ compose.yaml: the content


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return cast("dict[str, Any]", load_yaml(REPO / "compose.yaml")["services"])


def test_compose_services(services: dict[str, Any]) -> None:
    assert set(services) == {"gateway", "vllm", "vllm-cpu", "postgres", "prometheus", "grafana"}
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["vllm-cpu"]["profiles"] == ["cpu"]


def test_compose_gateway(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    assert gateway["build"]["dockerfile"] == "Dockerfile"
    env = gateway["environment"]
    assert env["TOKENPORT_DATABASE_URL"] == "postgresql+psycopg://tokenport:tokenport@postgres:5432/tokenport"
    assert env["TOKENPORT_SECRET_KEY"] == "${TOKENPORT_SECRET_KEY:?set it}"
    assert env["TOKENPORT_ADMIN_TOKEN"] == "${TOKENPORT_ADMIN_TOKEN:?set it}"
    assert gateway["command"] == ["--worker", "smollm2-135m-instruct=http://vllm:8000"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    # tenant metrics: on the listener Prometheus reaches in the compose network, never published
    assert env["TOKENPORT_GATEWAY__METRICS_HOST"] == "0.0.0.0"
    assert gateway["ports"] == ["8000:8000"] and gateway["expose"] == ["9464"]


@pytest.mark.parametrize("name", ["vllm", "vllm-cpu"])
def test_compose_workers_report_usage_and_publish_no_port(services: dict[str, Any], name: str) -> None:
    worker = services[name]
    assert "ports" not in worker, f"{name} must not be reachable from the host (/invocations has no auth)"
    for flag in WORKER_FLAGS:
        assert flag in worker["command"], f"{name} lacks {flag}"
    assert "--served-model-name=smollm2-135m-instruct" in worker["command"]


def test_compose_gpu_and_cpu_workers(services: dict[str, Any]) -> None:
    gpu = services["vllm"]
    assert gpu["image"].startswith("vllm/vllm-openai:")
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    cpu = services["vllm-cpu"]
    assert "vllm-cpu-release-repo" in cpu["image"]
    assert "deploy" not in cpu
    # The gateway and Prometheus reach whichever worker runs as `vllm`.
    assert "vllm" in cpu["networks"]["default"]["aliases"]


def test_compose_postgres_prometheus_grafana(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    prometheus = services["prometheus"]
    assert "./configs/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.compose.yml" in prometheus["command"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana-oss")
    assert "./configs/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./configs/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]


def test_compose_mounts_exist(services: dict[str, Any]) -> None:
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source


# ------------------------------------------------------------------ Dockerfile


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage (continuation lines joined, comments dropped)."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert re.match(r"FROM \S+ AS builder", stages[0][0], re.IGNORECASE)
    final = "\n".join(stages[-1])
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (REPO / "Dockerfile").read_text()


def test_dockerfile_builder_installs_the_project_wheel_without_extras() -> None:
    builder = "\n".join(dockerfile_stages()[0])
    assert "pip wheel" in builder and "/opt/venv/bin/pip install /wheels/tokenport-" in builder
    assert "vllm" not in builder.lower()
    assert "[cpu]" not in builder and "[gpu]" not in builder


def test_dockerfile_final_stage_runs_as_non_root_with_a_healthcheck() -> None:
    final = dockerfile_stages()[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, users
    assert users[-1] == "tokenport"
    healthchecks = [line for line in final if line.upper().startswith("HEALTHCHECK ")]
    assert len(healthchecks) == 1
    assert "urllib" in healthchecks[0] and "http://127.0.0.1:8000/healthz" in healthchecks[0]
    assert "EXPOSE 8000" in final
    assert 'ENTRYPOINT ["tokenport", "gateway", "--host", "0.0.0.0"]' in final


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    final = "\n".join(dockerfile_stages()[-1])
    for tool in ("gcc", "g++", "build-essential", "make ", "clang", "-dev "):
        assert tool not in final, f"final stage mentions {tool!r}"
    assert "vllm" not in final.lower()


def test_dockerignore_keeps_the_build_inputs() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "data", "tests"} <= ignored
    for needed in ("pyproject.toml", "README.md", "serving", "metering", "billing", "configs"):
        assert needed not in ignored
