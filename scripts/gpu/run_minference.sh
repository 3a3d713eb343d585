#!/usr/bin/env bash
# GPU host (see scripts/gpu/README.md): issue 24's per-head (MInference) kernel. First its GPU
# tests (tests/gpu/test_head_sparse_triton.py, plus the interpreter cases compiled), then the kernel benchmark
# (benchmarks/minference_kernel.py: one 8B-shape layer at 128K and 256K, vertical-slash,
# block-sparse and the triangle vs cuDNN dense and FlexAttention, the three ideals; the grid
# at 128K).
# Needs only the host's torch + Triton (no vLLM, no stash). About 4 minutes at most.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv \
  > "$OUT/minference_nvidia_smi.txt" 2>&1
# the tests get 90 s (a hang must not eat the benchmark's time); ~25 kernel variants compile
# (session 3 added the plan and estimate kernels and 64-token-tile cases), so 4 xdist
# workers when the image has pytest-xdist (it lists it; checked, not assumed)
XDIST=(); python3 -c "import xdist" 2>/dev/null && XDIST=(-n 4)
timeout -k 5 90 python3 -m pytest tests/gpu/test_head_sparse_triton.py tests/unit/head_sparse_triton_cases.py \
  -q -p no:cacheprovider --tb=short "${XDIST[@]}" > "$OUT/minference_gpu_tests.txt" 2>&1
echo "gpu tests rc=$? : $(tail -1 "$OUT/minference_gpu_tests.txt")"
# the benchmark stops starting new work at --budget-s and writes its JSON; SIGTERM at the
# outer limit also writes what exists (SIGKILL 10 s later)
# 128K in full; 256K (headline, block-sparse, triangle; no Flex) when 128K's timings predict
# it fits; --grid: MMInference's grid at 128K last, with what is left
timeout -k 10 165 python3 benchmarks/minference_kernel.py --out "$OUT" --budget-s 140 --grid \
  --tests-log "$OUT/minference_gpu_tests.txt" > "$OUT/minference_kernel.log" 2>&1
echo "benchmark rc=$?"
tail -25 "$OUT/minference_kernel.log"
