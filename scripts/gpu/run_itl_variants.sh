#!/usr/bin/env bash
# GPU host, work call (see scripts/gpu/README.md; carry as for run_ttft.sh): issue 18's decode
# ITL with one kernel-launch setting changed per TriangleMix server (gpu_itl_variants.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. scripts/gpu/setup.sh || exit 2
pkill -f vllm.entrypoints.openai.api_server; sleep 5
timeout 540 python3 benchmarks/gpu_itl_variants.py --out "$OUT" 2>&1 | tail -30
