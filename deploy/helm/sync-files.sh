#!/usr/bin/env bash
# Copy the Prometheus rules and Grafana dashboards from configs/ into the chart (helm reads only
# files inside the chart directory). tests/deploy/test_helm_chart.py fails while the copies differ.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
chart="$repo/deploy/helm/tokenport/files"
mkdir -p "$chart/prometheus/rules" "$chart/grafana/dashboards"
rm -f "$chart"/prometheus/rules/*.yml "$chart"/grafana/dashboards/*.json
cp "$repo"/configs/prometheus/rules/alerts.yml "$repo"/configs/prometheus/rules/recording.yml "$chart/prometheus/rules/"
cp "$repo"/configs/grafana/dashboards/*.json "$chart/grafana/dashboards/"
echo "synced into $chart"
