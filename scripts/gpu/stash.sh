#!/usr/bin/env bash
# GPU host, the first calls of a session (from the repo root): keep whatever bundle chunks
# this call carried in /root/stash, which outlives the call while the host stays warm (~30 s:
# send the next call right away), and install the dependency wheels into /tmp/site.
set -euo pipefail
mkdir -p /root/stash /tmp/site
for f in .gpu_bundle/*.part[0-9] .gpu_bundle/SHA256SUMS; do
  [ -f "$f" ] && cp "$f" /root/stash/
done
for d in llama8b docs; do
  [ -d ".gpu_bundle/$d" ] && rm -rf "/root/stash/$d" && cp -r ".gpu_bundle/$d" /root/stash/
done
for d in .gpu_bundle/deps .gpu_bundle/deps_b; do
  [ -d "$d" ] || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$d"/*.whl 2>&1 | grep -v "already exists" | tail -3 || true
done
echo "stashed: $(ls /root/stash | tr '\n' ' ')"
