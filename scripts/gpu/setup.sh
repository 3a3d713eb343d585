#!/usr/bin/env bash
# GPU host, start of a work call (source it from the repo root: `. scripts/gpu/setup.sh`).
# Needs the chunks stashed by earlier calls (scripts/gpu/README.md). Idempotent while the
# host stays warm. Installs vLLM 0.26.0 and this project into /tmp/site (so vLLM finds the
# `vllm.general_plugins` entry point), converts SmolLM2's GGUF to /root/models/smollm2 and
# lays out /root/models/llama8b (dummy weights), then exports the environment vLLM needs.
S=/root/stash
[ -f .gpu_bundle/vllm026.tar.xz.part1 ] && cp .gpu_bundle/vllm026.tar.xz.part1 $S/
[ -f .gpu_bundle/SHA256SUMS ] && cp .gpu_bundle/SHA256SUMS $S/
(cd $S && [ -f vllm026.tar.xz.part0 ] && [ -f vllm026.tar.xz.part1 ] \
  && sha256sum -c --quiet --ignore-missing SHA256SUMS) || {
  echo "FATAL: bundle chunks missing or corrupt in $S (the host was recycled?): run the stash calls again"
  return 2 2>/dev/null || exit 2; }
mkdir -p /tmp/site
[ -d /tmp/site/vllm ] || cat $S/vllm026.tar.xz.part0 $S/vllm026.tar.xz.part1 | xz -dc -T0 | tar -x -C /tmp/site
# FlashInfer is not carried: its sampler must be off or the engine fails at start.
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
  --target /tmp/site . 2>&1 | grep -v "already exists\|WARNING: Target" | tail -3
mkdir -p /root/models
if [ ! -f /root/models/smollm2/.tessera-complete ] && [ -f $S/smollm2.gguf.part1 ]; then
  cat $S/smollm2.gguf.part0 $S/smollm2.gguf.part1 > /root/smollm2.gguf
  python3 -c "from pathlib import Path; from server.model_prep import convert_gguf; \
convert_gguf(Path('/root/smollm2.gguf'), Path('/root/models/smollm2'))"
fi
if [ ! -f /root/models/llama8b/tokenizer.json ] && [ -d $S/llama8b ]; then
  rm -rf /root/models/llama8b && cp -r $S/llama8b /root/models/llama8b
  xz -dk /root/models/llama8b/tokenizer.json.xz
fi
python3 -c "import vllm, attention_backends.plugin; print('vllm', vllm.__version__, 'ready')"
