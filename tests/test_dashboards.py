"""Grafana dashboards and provisioning: structure, variables, metric names, and PromQL.

The PromQL checks start a throw-away Prometheus (the `prometheus` binary; Debian package
`prometheus`) on a free loopback port:
- every dashboard query must parse (Prometheus answers 400 to a syntax error);
- every query must return data from a small fake exporter shaped like the metric contract
  (catches wrong label names, impossible joins, typos in matchers).
The live test against a real gateway and vLLM worker uses tests/dashboard_queries.py too.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

try:  # tests/ is a package once it gets an __init__.py; until then it is on sys.path itself.
    from tests.dashboard_queries import (
        BUILTIN_VALUES,
        METRIC_NAMES,
        fill_variables,
        iter_dashboard_queries,
        iter_panels,
        iter_variable_queries,
        load_dashboards,
        metric_names_in,
        referenced_variables,
        variable_query,
        variables,
    )
except ImportError:
    from dashboard_queries import (  # type: ignore[no-redef]
        BUILTIN_VALUES,
        METRIC_NAMES,
        fill_variables,
        iter_dashboard_queries,
        iter_panels,
        iter_variable_queries,
        load_dashboards,
        metric_names_in,
        referenced_variables,
        variable_query,
        variables,
    )

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "configs" / "grafana"
DASHBOARDS_DIR = GRAFANA / "dashboards"
RECORDING_RULES = REPO / "configs" / "prometheus" / "rules" / "recording.yml"
DS = {"type": "prometheus", "uid": "prometheus"}
EXPECTED_DASHBOARDS = {"tenant-usage", "token-exports", "workers", "gateway"}
VALUES = {"tenant": "acme"}  # the only variable without an "All" value


def _collect(function: Any) -> list[Any]:
    # An undefined variable would stop collection of this whole file; instead collect nothing
    # and let test_every_variable_used_is_defined and test_helper_* name the culprit.
    try:
        return list(function(DASHBOARDS_DIR, VALUES))
    except KeyError:
        return []


DASHBOARDS = load_dashboards(DASHBOARDS_DIR)
QUERIES = _collect(iter_dashboard_queries)
VARIABLE_QUERIES = _collect(iter_variable_queries)


def _query_id(q: Any) -> str:
    return f"{q[0]}/{q[1]}"


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"]}


def all_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


# ------------------------------------------------------------------ structure


def test_the_four_dashboards_exist() -> None:
    assert set(DASHBOARDS) == EXPECTED_DASHBOARDS


@pytest.mark.parametrize("path", sorted(DASHBOARDS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_dashboard_is_valid_json_with_uid_and_title(path: Path) -> None:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    assert "tokenport" in dashboard["tags"]
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]


def test_dashboard_uids_are_unique() -> None:
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panel_ids_are_unique(name: str) -> None:
    ids = [panel["id"] for panel in iter_panels(DASHBOARDS[name])]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"{name}: duplicate panel ids {duplicates}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_target_uses_the_prometheus_datasource_and_has_an_expr(name: str) -> None:
    dashboard = DASHBOARDS[name]
    for panel in iter_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"{name}: panel {panel['title']!r} has no targets"
        assert panel.get("datasource", DS) == DS, f"{name}: panel {panel['title']!r}"
    for panel, target in all_targets(dashboard):
        assert target.get("datasource") == DS, f"{name}: {panel['title']!r} {target.get('refId')}"
        assert target.get("expr", "").strip(), f"{name}: {panel['title']!r} has an empty expr"
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            assert variable.get("datasource") == DS, f"{name}: variable {variable['name']}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_variable_used_is_defined(name: str) -> None:
    dashboard = DASHBOARDS[name]
    defined = set(variables(dashboard))
    texts = [target["expr"] for _, target in all_targets(dashboard)]
    texts += [variable_query(v) for v in variables(dashboard).values()]
    for text in texts:
        used = {v for v in referenced_variables(text) if not v.startswith("__")}
        assert used <= defined, f"{name}: undefined {used - defined} in {text}"
        grafana_own = {v for v in referenced_variables(text) if v.startswith("__")}
        assert grafana_own <= set(BUILTIN_VALUES), f"{name}: unknown {grafana_own} in {text}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_queries_use_only_contract_metrics_and_recording_rules(name: str) -> None:
    known = METRIC_NAMES | recorded_names()
    for panel, target in all_targets(DASHBOARDS[name]):
        unknown = metric_names_in(target["expr"]) - known
        assert not unknown, f"{name}: {panel['title']!r} uses unknown metrics {unknown}"
    for variable in variables(DASHBOARDS[name]).values():
        unknown = metric_names_in(variable_query(variable)) - known
        assert not unknown, f"{name}: variable {variable['name']} uses unknown metrics {unknown}"


def test_metric_names_in_finds_names_and_ignores_strings() -> None:
    expr = 'sum(rate(tokenport_tokens_total{route="up"}[5m])) / up + tokenport:tokens:rate5m'
    assert metric_names_in(expr) == {"tokenport_tokens_total", "up", "tokenport:tokens:rate5m"}


# ------------------------------------------------------------------ what each dashboard shows


def exprs(name: str) -> list[str]:
    return [target["expr"] for _, target in all_targets(DASHBOARDS[name])]


def test_tenant_usage_is_per_tenant() -> None:
    dashboard = DASHBOARDS["tenant-usage"]
    tenant = variables(dashboard)["tenant"]
    assert tenant["type"] == "query"
    assert variable_query(tenant).replace(" ", "") == "label_values(tokenport_tokens_total,tenant)"
    assert not tenant.get("includeAll"), "one tenant at a time"
    text = "\n".join(exprs("tenant-usage"))
    assert 'tenant="$tenant"' in text
    assert "[$__range]" in text  # tokens and spend over the range (month to date by default)
    assert dashboard["time"]["from"] == "now/M"
    assert "tokenport_estimated_spend_total" in text and "by (currency)" in text
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, model) (tokenport:request_duration" in text
        assert f"histogram_quantile({q}, sum by (le, model) (tokenport:time_to_first_token" in text
    assert "sum by (outcome)" in text


def test_token_exports_has_a_country_geomap_and_table() -> None:
    panels = list(iter_panels(DASHBOARDS["token-exports"]))
    geomaps = [p for p in panels if p["type"] == "geomap"]
    assert len(geomaps) == 1
    geomap = geomaps[0]
    layer = geomap["options"]["layers"][0]
    assert layer["location"] == {
        "mode": "lookup",
        "lookup": "origin_country",
        "gazetteer": "public/gazetteer/countries.json",
    }
    (target,) = geomap["targets"]
    assert target["format"] == "table" and target["instant"] is True
    assert "by (origin_country)" in target["expr"]
    tables = [p for p in panels if p["type"] == "table"]
    assert any("by (origin_country)" in t["expr"] for p in tables for t in p["targets"])
    text = "\n".join(exprs("token-exports"))
    assert "by (model)" in text and "by (language)" in text
    assert "tokenport_estimated_spend_total" in text  # estimated revenue
    assert DASHBOARDS["token-exports"]["time"]["from"] == "now/M"


def test_token_exports_shows_the_token_premium_by_language() -> None:
    (panel,) = [
        p for p in iter_panels(DASHBOARDS["token-exports"]) if p["title"] == "Token premium by language"
    ]
    (expr,) = [t["expr"] for t in panel["targets"]]
    compact = expr.replace(" ", "").replace("\n", "")
    # tokens per character of each language, over English's on the same model
    assert "sumby(model,language)(increase(tokenport_tokens_total" in compact
    assert "sumby(model,language)(increase(tokenport_characters_total" in compact
    assert "/on(model)group_left" in compact and 'language="en"' in compact


def test_workers_dashboard_covers_the_vllm_metrics() -> None:
    text = "\n".join(exprs("workers"))
    for metric in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
    ):
        assert metric in text, metric
    assert "by (finished_reason)" in text


def test_gateway_dashboard_covers_the_gateway_metrics() -> None:
    text = "\n".join(exprs("gateway"))
    for metric in (
        "tokenport_http_responses_total",
        "tokenport_gateway_overhead_seconds_bucket",
        "tokenport_upstream_duration_seconds_bucket",
        "tokenport_inflight_requests",
        "tokenport_ledger_commit_seconds_bucket",
        "tokenport_worker_healthy",
        "tokenport_label_values",
        "tokenport_label_cap",
    ):
        assert metric in text, metric
    assert "sum by (status)" in text


# ------------------------------------------------------------------ provisioning


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = config["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"


def test_dashboard_provisioning_points_at_the_mounted_folder() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tokenport.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# ------------------------------------------------------------------ the helper


def test_helper_fills_grafana_and_dashboard_variables() -> None:
    values = {"tenant": "acme", **BUILTIN_VALUES}
    assert (
        fill_variables('rate(x{tenant="${tenant}"}[$__rate_interval]) [$__range] $__interval', values)
        == 'rate(x{tenant="acme"}[1m]) [1h] 15s'
    )
    with pytest.raises(KeyError):
        fill_variables('x{tenant="$tenant"}', BUILTIN_VALUES)


def test_helper_returns_every_target_with_no_variable_left() -> None:
    targets = sum(1 for d in DASHBOARDS.values() for _ in all_targets(d))
    assert len(QUERIES) == targets
    for dashboard, panel_title, expr in QUERIES:
        assert "$" not in expr, f"{dashboard}/{panel_title}: {expr}"
    assert {q.variable for q in VARIABLE_QUERIES} >= {"tenant", "model", "model_name", "instance"}


def test_helper_requires_a_value_for_tenant() -> None:
    with pytest.raises(KeyError, match="tenant"):
        iter_dashboard_queries(DASHBOARDS_DIR)


# ------------------------------------------------------------------ PromQL against Prometheus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_prometheus(workdir: Path, config_text: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus)")
    config = workdir / "prometheus.yml"
    config.write_text(config_text)
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:  # the child keeps its own copy
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    stop(process)
    pytest.fail("prometheus did not start:\n" + (workdir / "prometheus.log").read_text()[-3000:])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def query(url: str, expr: str) -> tuple[int, dict[str, Any]]:
    """Instant query; returns (HTTP status, parsed body). 400 = syntax error."""
    request = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus with nothing to scrape: only the query parser matters."""
    process, url = start_prometheus(
        tmp_path_factory.mktemp("prometheus-empty"), "global:\n  scrape_interval: 15s\n"
    )
    yield url
    stop(process)


def test_prometheus_rejects_invalid_promql(empty_prometheus: str) -> None:
    """The check below can fail: a broken expression is a 400."""
    status, body = query(empty_prometheus, "sum by (tenant (rate(tokenport_tokens_total[5m]))")
    assert status == 400 and body["errorType"] == "bad_data"


@pytest.mark.parametrize("q", QUERIES, ids=_query_id)
def test_dashboard_query_is_valid_promql(empty_prometheus: str, q: Any) -> None:
    status, body = query(empty_prometheus, q.expr)
    assert status == 200, f"{q.dashboard}/{q.panel_title}: {body.get('error')}\n{q.expr}"


@pytest.mark.parametrize("q", VARIABLE_QUERIES, ids=lambda q: f"{q.dashboard}/${q.variable}")
def test_variable_selector_is_valid_promql(empty_prometheus: str, q: Any) -> None:
    status, body = query(empty_prometheus, q.selector)
    assert status == 200, f"{q.dashboard}/${q.variable}: {body.get('error')}\n{q.selector}"


# ------------------------------------------------------------------ queries return data

# One fake exporter shaped like the metric contract (gateway and vLLM). Counters grow on each
# scrape so rates are non-zero. Two tenants with one currency each, three origin countries.
MODEL = "smollm2-135m-instruct"


def _histogram(name: str, labels: str, n: int) -> list[str]:
    prefix = f"{labels}," if labels else ""
    lines = [
        f'{name}_bucket{{{prefix}le="{le}"}} {n * count}'
        for le, count in (("0.05", 1), ("0.5", 3), ("5", 4), ("+Inf", 4))
    ]
    braces = f"{{{labels}}}" if labels else ""
    return [*lines, f"{name}_sum{braces} {n * 2.5}", f"{name}_count{braces} {n * 4}"]


def gateway_metrics(n: int) -> str:
    lines = []
    for tenant, country, language in (("acme", "DE", "de"), ("acme", "FR", "fr"), ("globex", "US", "en")):
        for token_type, per_scrape in (("input", 100), ("cached_input", 20), ("output", 50)):
            lines.append(
                f'tokenport_tokens_total{{tenant="{tenant}",origin_country="{country}",model="{MODEL}",'
                f'token_type="{token_type}",language="{language}"}} {n * per_scrape}'
            )
    for language, chars in (("de", 300), ("fr", 280), ("en", 400)):  # per scrape, prompt and completion
        for part in ("prompt", "completion"):
            lines.append(
                f'tokenport_characters_total{{model="{MODEL}",language="{language}",part="{part}"}} '
                f"{n * chars}"
            )
    for tenant in ("acme", "globex"):
        for outcome in ("ok", "client_cancelled", "upstream_error", "rejected"):
            lines.append(
                f'tokenport_requests_total{{tenant="{tenant}",model="{MODEL}",outcome="{outcome}"}} {n}'
            )
    lines.append(f'tokenport_estimated_spend_total{{tenant="acme",currency="EUR"}} {n * 0.02}')
    lines.append(f'tokenport_estimated_spend_total{{tenant="globex",currency="USD"}} {n * 0.03}')
    for status in ("200", "429", "502"):
        lines.append(f'tokenport_http_responses_total{{route="/v1/chat/completions",status="{status}"}} {n}')
    for stream in ("true", "false"):
        lines += _histogram("tokenport_request_duration_seconds", f'model="{MODEL}",stream="{stream}"', n)
    lines += _histogram("tokenport_time_to_first_token_seconds", f'model="{MODEL}"', n)
    lines += _histogram("tokenport_upstream_duration_seconds", f'model="{MODEL}",worker="w1"', n)
    lines += _histogram("tokenport_gateway_overhead_seconds", 'route="/v1/chat/completions"', n)
    lines += _histogram("tokenport_ledger_commit_seconds", "", n)
    lines.append(f'tokenport_inflight_requests{{model="{MODEL}"}} 2')
    lines.append(f'tokenport_worker_healthy{{worker="w1",model="{MODEL}"}} 1')
    lines.append(f'tokenport_usage_estimated_total{{model="{MODEL}"}} {n}')
    for token_type in ("input", "cached_input", "output"):
        labels = f'worker="w1",model="{MODEL}",token_type="{token_type}"'
        lines.append(f"tokenport_metering_drift_ratio{{{labels}}} 0.001")
        lines.append(f"tokenport_metering_drift_tokens{{{labels}}} 3")
    for label, count in (("tenant", 2), ("origin_country", 3), ("language", 3)):
        lines.append(f'tokenport_label_values{{label="{label}"}} {count}')
        lines.append(f'tokenport_label_cap{{label="{label}"}} 100')
        lines.append(f'tokenport_label_overflow_total{{label="{label}"}} {n}')
    lines.append('tokenport_budget_used_ratio{tenant="acme"} 0.4')
    return "\n".join(lines) + "\n"


def vllm_metrics(n: int) -> str:
    labels = f'model_name="{MODEL}",engine="0"'
    lines = [
        f"vllm:num_requests_running{{{labels}}} 1",
        f"vllm:num_requests_waiting{{{labels}}} 0",
        f"vllm:kv_cache_usage_perc{{{labels}}} 0.25",
        f"vllm:prompt_tokens_total{{{labels}}} {n * 360}",
        f"vllm:generation_tokens_total{{{labels}}} {n * 150}",
    ]
    for reason in ("stop", "length", "abort"):
        lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {n}')
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        lines += _histogram(f"vllm:{name}_seconds", labels, n)
    return "\n".join(lines) + "\n"


class FakeExporter(BaseHTTPRequestHandler):
    scrapes: ClassVar[dict[str, int]] = {"/gateway/metrics": 0, "/vllm/metrics": 0}

    def do_GET(self) -> None:
        if self.path not in self.scrapes:
            self.send_error(404)
            return
        self.scrapes[self.path] += 1
        n = self.scrapes[self.path]
        body = (gateway_metrics(n) if self.path.startswith("/gateway") else vllm_metrics(n)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def scraping_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping the fake exporter every second, with the real recording rules."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeExporter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    exporter = f"127.0.0.1:{server.server_address[1]}"
    config = f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RECORDING_RULES}
scrape_configs:
  - job_name: tokenport-gateway
    metrics_path: /gateway/metrics
    static_configs: [{{targets: ["{exporter}"]}}]
  - job_name: vllm-workers
    metrics_path: /vllm/metrics
    static_configs: [{{targets: ["{exporter}"]}}]
"""
    process, url = start_prometheus(tmp_path_factory.mktemp("prometheus-scraping"), config)
    try:
        # Wait until rates over recorded series exist: a few scrapes and rule evaluations.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, body = query(
                url, "count(tokenport:tokens:rate5m > 0) and count(tokenport:vllm_prompt_tokens:rate5m > 0)"
            )
            if body.get("data", {}).get("result"):
                break
            time.sleep(0.5)
        else:
            pytest.fail("prometheus never recorded rates from the fake exporter")
        time.sleep(2)  # one more rule evaluation for every group
        yield url
    finally:
        stop(process)
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("q", QUERIES, ids=_query_id)
def test_dashboard_query_returns_data(scraping_prometheus: str, q: Any) -> None:
    status, body = query(scraping_prometheus, q.expr)
    assert status == 200, f"{q.dashboard}/{q.panel_title}: {body.get('error')}\n{q.expr}"
    assert body["data"]["result"], f"{q.dashboard}/{q.panel_title}: no data\n{q.expr}"


@pytest.mark.parametrize("q", VARIABLE_QUERIES, ids=lambda q: f"{q.dashboard}/${q.variable}")
def test_variable_query_finds_values(scraping_prometheus: str, q: Any) -> None:
    _, body = query(scraping_prometheus, q.selector)
    values = {series["metric"].get(q.label) for series in body["data"]["result"]}
    assert values - {None}, f"{q.dashboard}/${q.variable}: no {q.label} values for {q.selector}"
