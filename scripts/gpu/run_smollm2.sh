#!/usr/bin/env bash
# GPU host, work call (see scripts/gpu/README.md): SmolLM2-135M (real weights) served by vLLM
# 0.26: FA3 vs tessera-dense tokens, split search, task suite, negative control, usage counters.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. scripts/gpu/setup.sh || exit 2
echo "== SmolLM2 serving"
timeout 500 python3 benchmarks/gpu_smollm2_serving.py --out "$OUT" 2>&1 | tail -40
