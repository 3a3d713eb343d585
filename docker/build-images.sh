#!/usr/bin/env bash
# `make images`: build every image of the CPU stack with nothing pulled from a registry.
#   1. the base image from Debian packages (debootstrap; docker/build-base.sh), unless present;
#   2. the torch CPU wheel into docker/wheels/ (not on the package index);
#   3. gateway, CPU worker and Prometheus images on that base, one at a time (2-core machines),
#      through compose so the build settings live in one place (compose.yaml).
# Writes build times and image sizes to $TESSERA_IMAGES_REPORT
# (default benchmarks/results/compose_images.json).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
report="${TESSERA_IMAGES_REPORT:-$repo/benchmarks/results/compose_images.json}"
log() { printf '[images] %s\n' "$*" >&2; }

export COMPOSE_PROFILES=cpu
export TESSERA_BASE_IMAGE="${TESSERA_BASE_IMAGE:-tessera-serve/base:bookworm}"
# No PyTorch index here: the CPU wheel comes from docker/wheels/.
export TESSERA_TORCH_INDEX_URL="${TESSERA_TORCH_INDEX_URL-}"
# This machine's CA bundle lets pip inside the build through the TLS-inspecting proxy; on an
# ordinary machine it is the system bundle and changes nothing. Passed as a build secret.
if [[ -z "${TESSERA_EXTRA_CA:-}" && -s /etc/ssl/certs/ca-certificates.crt ]]; then
    export TESSERA_EXTRA_CA=/etc/ssl/certs/ca-certificates.crt
fi

declare -A seconds
tag="${TESSERA_TAG:-latest}"
# A rebuild over existing images and build cache takes seconds: say which kind this was.
if docker image inspect "tessera-serve/worker-cpu:$tag" >/dev/null 2>&1; then
    kind="rebuild (worker image existed; build cache may be warm)"
else
    kind="first build on this engine (no worker image before)"
fi
start=$(date +%s)
t0=$(date +%s)
"$here/build-base.sh" "$TESSERA_BASE_IMAGE"
seconds[base]=$(( $(date +%s) - t0 ))

if ! compgen -G "$here/wheels/torch-*.whl" >/dev/null; then
    log "copying the torch CPU wheel into docker/wheels/"
    python3 -m pip download --no-deps -d "$here/wheels" "torch==2.13.0" >&2
fi

cd "$here"
for service in gateway prometheus worker-1; do
    log "building $service on $TESSERA_BASE_IMAGE"
    t0=$(date +%s)
    docker compose build --progress plain "$service" >&2
    seconds[$service]=$(( $(date +%s) - t0 ))
    log "$service built in ${seconds[$service]} s"
done
total=$(( $(date +%s) - start ))

size() { docker image inspect -f '{{.Size}}' "$1"; }
mkdir -p "$(dirname "$report")"
cat >"$report" <<JSON
{
  "what": "make images: local build of the CPU stack, nothing pulled",
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "machine": "$(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB",
  "kind": "$kind",
  "total_build_s": $total,
  "build_s": {
    "base": ${seconds[base]},
    "gateway": ${seconds[gateway]},
    "prometheus": ${seconds[prometheus]},
    "worker_cpu": ${seconds[worker-1]}
  },
  "size_bytes": {
    "base": $(size "$TESSERA_BASE_IMAGE"),
    "gateway": $(size "tessera-serve/gateway:$tag"),
    "prometheus": $(size "tessera-serve/prometheus:$tag"),
    "worker_cpu": $(size "tessera-serve/worker-cpu:$tag")
  }
}
JSON
log "all images built in $total s; report: $report"
cat "$report" >&2
