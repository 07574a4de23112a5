#!/usr/bin/env bash
# Build the gateway image (the Dockerfile) without Docker and without a registry: Debian's buildah,
# on a base file system made from Debian's packages by mmdebstrap (bookworm + its Python 3.11).
#
#   bash deploy/image/build.sh              # -> localhost/tokenport:dev
#   IMAGE=registry.example/tokenport:1.2 bash deploy/image/build.sh
#
# Needs root (or a user with subuids) and: apt-get install buildah podman mmdebstrap.
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=${BASE_IMAGE:-localhost/bookworm-python:3.11}
TAG=${IMAGE:-localhost/tokenport:dev}
for tool in buildah podman mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install buildah podman mmdebstrap" >&2; exit 2; }
done
if ! podman image exists "$BASE"; then
  tar=$(mktemp --suffix=.tar)
  mmdebstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates bookworm "$tar"
  podman import "$tar" "$BASE"
  rm -f "$tar"
fi
# A machine behind a TLS-inspecting proxy (these build machines are) has its CA in the host bundle:
# mounted for the build's RUN steps only (pip), never copied into the image.
ca=()
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  ca=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
buildah bud --isolation chroot --format docker "${ca[@]}" --build-arg PYTHON_IMAGE="$BASE" -t "$TAG" -f Dockerfile .  # docker format keeps HEALTHCHECK
podman image ls "$TAG"
