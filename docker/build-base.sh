#!/usr/bin/env bash
# Build the local base image from Debian's packages with debootstrap, for machines that cannot
# pull from a container registry (this one, air-gapped sites). The result stands in for
# python:3.11-slim-bookworm: Debian bookworm, python3 (3.11) with venv, CA certificates, apt.
#
#   docker/build-base.sh [IMAGE]        (default tessera-serve/base:bookworm)
#
# Skipped when IMAGE exists already (set FORCE=1 to rebuild). Needs root, debootstrap, docker.
set -euo pipefail

IMAGE="${1:-${TESSERA_BASE_IMAGE:-tessera-serve/base:bookworm}}"
SUITE="${SUITE:-bookworm}"
log() { printf '[build-base] %s\n' "$*" >&2; }

if [[ -z "${FORCE:-}" ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE exists; FORCE=1 rebuilds it"
    exit 0
fi

# The mirror this host already uses for bookworm (deb822 or one-line sources).
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(grep -rhs -A3 '^Types: deb' /etc/apt/sources.list.d/*.sources \
        | awk '/^URIs:/ {print $2}' | grep -m1 -v security || true)"
fi
if [[ -z "$mirror" ]]; then
    mirror="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '$3 == "'"$SUITE"'" {print $2; exit}' || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

rootfs="$(mktemp -d /var/tmp/tessera-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
start=$(date +%s)
log "debootstrap $SUITE from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$mirror" >&2

# Slim it: package lists, docs, man pages and locales are not needed at run time; the image
# keeps apt and its sources so Dockerfiles on top can still `apt-get update && install`.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
    -exec rm -rf {} +
# Same as the official images: keep apt from re-adding docs on later installs.
cat >"$rootfs"/etc/dpkg/dpkg.cfg.d/01-slim <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG

tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
log "$IMAGE built in $(( $(date +%s) - start )) s, $(docker image inspect -f '{{.Size}}' "$IMAGE") bytes"
