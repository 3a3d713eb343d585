#!/usr/bin/env bash
# GPU host (see scripts/gpu/README.md): the TriangleMix kernel benchmark, one 8B-shape layer at
# 32K / 64K / 128K, 64-token cache blocks headline (16 and 128 too), the three ideals. Needs only
# the host's torch + Triton (no vLLM), so it can share a stash call.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 200 python3 benchmarks/trianglemix_kernel.py --out-dir "$OUT" --headline-block 64 \
  --alt-cache-blocks 16 128 --no-tests 2>&1 | tail -12
