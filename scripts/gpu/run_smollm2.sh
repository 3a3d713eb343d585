#!/usr/bin/env bash
# GPU host, work call (see scripts/gpu/README.md): kernel timings, then SmolLM2 serving.
# Usage: run_smollm2.sh [--no-kernel]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. scripts/gpu/setup.sh || exit 2
if [ "${1:-}" != "--no-kernel" ]; then
  echo "== kernel benchmark (GPU to itself)"
  timeout 170 python3 benchmarks/trianglemix_kernel.py --out-dir "$OUT" --headline-block 64 \
    --alt-cache-blocks 16 128 --no-tests 2>&1 | tail -8
fi
echo "== SmolLM2 serving"
timeout 520 python3 benchmarks/gpu_smollm2_serving.py --out "$OUT" 2>&1 | tail -40
