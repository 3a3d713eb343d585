#!/usr/bin/env bash
# GPU host, work call (see scripts/gpu/README.md): 8B-shape TTFT, tessera vs vLLM FA3.
# Usage: run_ttft.sh SIZE... [--stop]. Without --stop: decode ITL too (servers stay up for
# the next call). With --stop: the servers are stopped, then the GPU tests run.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. scripts/gpu/setup.sh || exit 2
sizes=(); stop=0
for a in "$@"; do if [ "$a" = "--stop" ]; then stop=1; else sizes+=("$a"); fi; done
# The first call also times decode after a 32K and a 600-token prompt (at 600 tokens the
# TriangleMix pattern is dense). The last call torch-profiles 20 decode steps in each server
# after its TTFT runs (the profiler's CUDA tracing never runs before a timing).
itl=(--itl --itl-prompts 32768 600)
flags=("${itl[@]}" --fresh); [ $stop = 1 ] && flags=(--profile-decode --stop)
[ "${ALL_IN_ONE:-0}" = 1 ] && flags=("${itl[@]}" --profile-decode --fresh --stop)
timeout 560 python3 benchmarks/gpu_serving_ttft.py --out "$OUT" --sizes "${sizes[@]}" \
  "${flags[@]}" 2>&1 | tail -45
tar -czf "$OUT/ttft_logs_$(echo "${sizes[@]}" | tr " " _).tar.gz" -C /root $(cd /root && ls server-*.log gateway-*.log 2>/dev/null) 2>/dev/null || true
if [ $stop = 1 ]; then
  echo "== tests/gpu"; timeout 240 python3 -m pytest -q tests/gpu 2>&1 | tail -4
fi
