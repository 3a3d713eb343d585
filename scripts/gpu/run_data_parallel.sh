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
    # with a 1,500-token system prompt and a 2,000-token document each, 8 turns. 1,800 blocks
    # of 16 tokens (28.8K tokens) per worker hold the system prompt and the 8 conversations
    # one worker gets under prefix affinity (~22K tokens with their growth), not all 16 that
    # each worker sees under least outstanding (~43K). Session 10 (2026-12-02) used 300
    # blocks, and session 11 450, both read as 64-token blocks; on the GPU a block holds 16
    # (vLLM's default there), so the caches held 4.8K / 7.2K tokens, under one worker's
    # running batch: both policies were preempted and thrashed alike (44.9%). The block size
    # is now explicit, and the benchmark records preemptions and warns on them.
    timeout 560 python3 benchmarks/prefix_affinity.py --gpu-model /root/models/llama8b \
      --worker-arg=--load-format --worker-arg=dummy --block-size 16 --kv-blocks 1800 \
      --doc-tokens 2000 \
      --think-s 0.5 --output gpu_prefix_affinity --out-dir "$OUT" 2>&1 | tail -12 ;;
esac
tar -czf "$OUT/data_parallel_logs.tar.gz" -C "$OUT" --exclude='*.tar.gz' --exclude='*.json' \
  --exclude='*.png' . 2>/dev/null || true
