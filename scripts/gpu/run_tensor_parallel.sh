#!/usr/bin/env bash
# 2-GPU host (nvidia-h200-x2), work call (scripts/gpu/README.md; carry as for run_smollm2.sh /
# run_ttft.sh): issue 26's tensor parallelism with tessera's backend, TP=2 vs TP=1.
#   bash scripts/gpu/run_tensor_parallel.sh equality             # padded SmolLM2, real weights
#   bash scripts/gpu/run_tensor_parallel.sh ttft 32768 65536     # 8B shape; servers stay up
#   bash scripts/gpu/run_tensor_parallel.sh ttft 130048 --stop   # next call: 128K, then stop
# Refuses (exit 3) on a host with fewer than 2 GPUs. NVLink multicast is off in every
# process (exported here too, so vLLM's own children inherit it whatever starts them).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$gpus" -lt 2 ]; then
  echo "run_tensor_parallel.sh: needs 2 GPUs, this host has $gpus: use the nvidia-h200-x2 kind"
  exit 3
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
. scripts/gpu/setup.sh || exit 2
phase=${1:-equality}; shift || true
case "$phase" in
  equality)
    pkill -f vllm.entrypoints.openai.api_server; sleep 3
    # SmolLM2's 9/3 heads do not split in two: a function-preserving 12/6 copy (real weights).
    [ -f /root/models/smollm2-tp2/config.json ] || python3 -m server.tp_padding \
      --src /root/models/smollm2 --dst /root/models/smollm2-tp2 --tensor-parallel-size 2
    timeout 540 python3 benchmarks/gpu_tensor_parallel.py equality --out "$OUT" 2>&1 | tail -40 ;;
  ttft)
    sizes=(); stop=()
    for a in "$@"; do if [ "$a" = "--stop" ]; then stop=(--stop); else sizes+=("$a"); fi; done
    timeout 560 python3 benchmarks/gpu_tensor_parallel.py ttft --out "$OUT" \
      --sizes "${sizes[@]}" "${stop[@]}" 2>&1 | tail -40 ;;
  *) echo "usage: run_tensor_parallel.sh equality | ttft SIZE... [--stop]"; exit 2 ;;
esac
nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv > "$OUT/nvidia_smi.csv" 2>&1
