#!/usr/bin/env bash
# GPU host (see scripts/gpu/README.md): issue 24's per-head (MInference) kernel. First its GPU
# tests (tests/gpu_minference, plus the interpreter cases compiled), then the kernel benchmark
# (benchmarks/minference_kernel.py: one 8B-shape layer at 128K and 256K, vertical-slash,
# block-sparse and the triangle vs cuDNN dense and FlexAttention, the three ideals; the grid
# at 128K).
# Needs only the host's torch + Triton (no vLLM, no stash). About 4 minutes at most.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv \
  > "$OUT/minference_nvidia_smi.txt" 2>&1
# the tests get 75 s; a hang there must not eat the benchmark's time
timeout -k 5 75 python3 -m pytest tests/gpu_minference tests/unit/head_sparse_triton_cases.py \
  -q -p no:cacheprovider --tb=short > "$OUT/minference_gpu_tests.txt" 2>&1
echo "gpu tests rc=$? : $(tail -1 "$OUT/minference_gpu_tests.txt")"
# the benchmark stops starting new work at --budget-s and writes its JSON; SIGTERM at the
# outer limit also writes what exists (SIGKILL 10 s later)
# --grid: MMInference's grid at 128K (token order vs the rows pass, vs dense) runs right after
# the 128K MInference numbers are written, before 256K
timeout -k 10 165 python3 benchmarks/minference_kernel.py --out "$OUT" --budget-s 140 --grid \
  --tests-log "$OUT/minference_gpu_tests.txt" > "$OUT/minference_kernel.log" 2>&1
echo "benchmark rc=$?"
tail -25 "$OUT/minference_kernel.log"
