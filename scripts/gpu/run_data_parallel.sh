#!/usr/bin/env bash
# GPU host, work call (see scripts/gpu/README.md; carry as for run_ttft.sh): issue 26's data
# parallel behind the gateway, 8B shape with dummy weights. Workers are placed by tessera's
# launcher (server/gpu_placement.py): on one GPU the two workers share it at half the memory
# each, on a 2-GPU host they get one GPU each.
#   bash scripts/gpu/run_data_parallel.sh load      # 1 vs 2 workers, 16 clients x 16K prompts
#   bash scripts/gpu/run_data_parallel.sh affinity  # prefix affinity vs least outstanding
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
. scripts/gpu/setup.sh || exit 2
pkill -f vllm.entrypoints.openai.api_server; sleep 3
case "${1:-load}" in
  load)
    timeout 560 python3 benchmarks/gpu_data_parallel.py --out "$OUT" 2>&1 | tail -30 ;;
  affinity)
    # Caches smaller than all conversations' prefixes (as in production): 16 conversations
    # with a 1,500-token system prompt and a 2,000-token document each, 8 turns. Blocks hold
    # 64 tokens. 450 blocks (28.8K tokens) per worker hold the system prompt and the 8
    # conversations one worker gets under prefix affinity (~21K tokens and their growth), not
    # all 16 that each worker sees under least outstanding (~41K). The first run (2026-12-02)
    # used 300 blocks, under even affinity's working set: both policies thrashed (58K
    # prefix-cache query tokens per ~3.7K-token request, i.e. preempted and recomputed) and
    # hit the same 44.9%.
    timeout 560 python3 benchmarks/prefix_affinity.py --gpu-model /root/models/llama8b \
      --worker-arg=--load-format --worker-arg=dummy --kv-blocks 450 --doc-tokens 2000 \
      --think-s 0.5 --output gpu_prefix_affinity --out-dir "$OUT" 2>&1 | tail -12 ;;
esac
tar -czf "$OUT/data_parallel_logs.tar.gz" -C "$OUT" --exclude='*.tar.gz' --exclude='*.json' \
  --exclude='*.png' . 2>/dev/null || true
