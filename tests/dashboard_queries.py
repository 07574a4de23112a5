"""Read every Prometheus query out of the Grafana dashboards, with the variables filled in.

Used by tests/test_dashboards.py (structure, PromQL syntax) and meant for a live test that runs
every dashboard query against a Prometheus scraping a real gateway and vLLM worker:

    for q in iter_dashboard_queries(DASHBOARDS_DIR, {"tenant": "acme"}):
        result = prometheus_query(q.expr)           # q.dashboard, q.panel_title for messages

Variables are filled as Grafana would:
- Grafana's own: $__range -> 1h, $__rate_interval -> 1m, $__interval -> 15s (see BUILTIN_VALUES);
- dashboard variables: the value passed in `values`, else the variable's "All" value (.*) when
  it has one, else its saved current value; a variable with none of these is an error.
Both `$name` and `${name}` are recognised.

Also: METRIC_NAMES, the metric names the dashboards and rules may use (the gateway's contract,
the vLLM engine's, and Prometheus' own `up`), and metric_names_in(expr) to check against it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

BUILTIN_VALUES: dict[str, str] = {
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
}

# $name or ${name} or ${name:format}
VARIABLE_RE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")

# Histograms expose _bucket, _sum and _count series.
_GATEWAY_HISTOGRAMS = [
    "tokenport_request_duration_seconds",
    "tokenport_time_to_first_token_seconds",
    "tokenport_upstream_duration_seconds",
    "tokenport_gateway_overhead_seconds",
    "tokenport_ledger_commit_seconds",
]
_GATEWAY_OTHERS = [
    "tokenport_tokens_total",
    "tokenport_characters_total",
    "tokenport_requests_total",
    "tokenport_http_responses_total",
    "tokenport_inflight_requests",
    "tokenport_worker_healthy",
    "tokenport_estimated_spend_total",
    "tokenport_usage_estimated_total",
    "tokenport_metering_drift_ratio",
    "tokenport_metering_drift_tokens",
    "tokenport_label_values",
    "tokenport_label_cap",
    "tokenport_label_overflow_total",
    "tokenport_budget_used_ratio",
]
_VLLM_HISTOGRAMS = [
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
]
_VLLM_OTHERS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
]

GATEWAY_METRICS: frozenset[str] = frozenset(
    _GATEWAY_OTHERS + [h + suffix for h in _GATEWAY_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
)
VLLM_METRICS: frozenset[str] = frozenset(
    _VLLM_OTHERS + [h + suffix for h in _VLLM_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
)
METRIC_NAMES: frozenset[str] = GATEWAY_METRICS | VLLM_METRICS | {"up"}

# Metric-looking names in PromQL: tokenport_*, tokenport:* (recording rules), vllm:*, up.
_METRIC_RE = re.compile(r"(?<![\w:\"])((?:tokenport|vllm)[\w:]*|up)(?=\s*[{\[)\s]|$)")


class DashboardQuery(NamedTuple):
    dashboard: str  # file name without .json, e.g. "tenant-usage"
    panel_title: str
    expr: str  # variables filled in


class VariableQuery(NamedTuple):
    dashboard: str
    variable: str
    selector: str  # the series selector inside label_values(...), variables filled in
    label: str


def load_dashboards(dashboards_dir: str | Path) -> dict[str, dict[str, Any]]:
    """File stem -> parsed dashboard, for every *.json in the folder."""
    return {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(Path(dashboards_dir).glob("*.json"))
    }


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: Mapping[str, Any]) -> str:
    """The query text of a query variable (Grafana stores a string or an object)."""
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else str(query)


def referenced_variables(text: str) -> set[str]:
    """Names of the variables used in an expression, Grafana's own ($__...) included."""
    return {braced or plain for braced, plain in VARIABLE_RE.findall(text)}


def metric_names_in(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (gateway, recording rules, vLLM, up)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(_METRIC_RE.findall(without_strings))


def _default_value(variable: Mapping[str, Any]) -> str | None:
    if variable.get("includeAll"):
        return str(variable.get("allValue") or ".*")
    current = variable.get("current", {}).get("value")
    if isinstance(current, list):
        current = "|".join(current) if current else None
    return str(current) if current else None


def fill_variables(expr: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for variable ${name} in: {expr}")
        return values[name]

    return VARIABLE_RE.sub(replace, expr)


def _values_for(dashboard: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
    values = dict(BUILTIN_VALUES)
    for name, variable in variables(dashboard).items():
        default = _default_value(variable)
        if default is not None:
            values[name] = default
    values.update(given)
    return values


def iter_dashboard_queries(
    dashboards_dir: str | Path, values: Mapping[str, str] | None = None
) -> list[DashboardQuery]:
    """(dashboard, panel title, expr with variables filled) for every panel target."""
    queries = []
    for name, dashboard in load_dashboards(dashboards_dir).items():
        filled = _values_for(dashboard, values or {})
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                expr = target.get("expr", "")
                queries.append(DashboardQuery(name, panel.get("title", ""), fill_variables(expr, filled)))
    return queries


_LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*$", re.DOTALL)


def iter_variable_queries(
    dashboards_dir: str | Path, values: Mapping[str, str] | None = None
) -> list[VariableQuery]:
    """The series selector and label of every label_values(selector, label) variable."""
    queries = []
    for name, dashboard in load_dashboards(dashboards_dir).items():
        filled = _values_for(dashboard, values or {})
        for var_name, variable in variables(dashboard).items():
            match = _LABEL_VALUES_RE.match(variable_query(variable))
            if variable.get("type") == "query" and match:
                selector, label = match.groups()
                queries.append(VariableQuery(name, var_name, fill_variables(selector, filled), label))
    return queries
