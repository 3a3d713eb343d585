#!/usr/bin/env bash
# GPU host (see scripts/gpu/README.md): issue 23's RetroInfer kernels. Their GPU tests
# (tests/gpu/test_retroinfer_gpu.py; 4 passed on the H200, 2026-12-01), then the decode
# benchmark (benchmarks/retroinfer_decode.py: 128K / 512K / 1M, batch 1 and 8, vs dense SDPA
# and Quest-style pages; the KV in CPU memory vs copying it all). Host torch + Triton only.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout -k 5 90 python3 -m pytest -q tests/gpu/test_retroinfer_gpu.py > "$OUT/retroinfer_gpu_tests.txt" 2>&1
echo "gpu tests rc=$?: $(tail -1 "$OUT/retroinfer_gpu_tests.txt")"
timeout -k 10 250 python3 benchmarks/retroinfer_decode.py --out "$OUT" > "$OUT/retroinfer_decode.log" 2>&1
echo "benchmark rc=$?"; tail -20 "$OUT/retroinfer_decode.log"
