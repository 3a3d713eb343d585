#!/usr/bin/env bash
# `make gpu-bundle`: build what travels to the GPU host (no network there) to run real vLLM
# 0.26.0 with tessera's backend. Runs on the CPU machine, which reaches the package index
# (~300 MB download the first time, ~2 min). Output, git-ignored, under .gpu_bundle/:
#   vllm026.tar.xz.part0|1   vLLM 0.26.0 (CUDA 13 wheel, trimmed), xz, split under 64 MiB/call
#   deps/, deps_b/           wheels the host lacks (scripts/gpu/deps.txt; cp312 manylinux), in two halves
#   smollm2.gguf.part0|1     SmolLM2-135M-Instruct Q4_1 GGUF (real weights; converted there)
#   llama8b/                 Llama-3.1-8B-shaped config + SmolLM2 tokenizer (dummy weights)
#   docs/                    the two long documents of the logit-fidelity probe
#   SHA256SUMS               of every chunk
# Which device calls carry what: scripts/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=.gpu_bundle; TMP=$B/build
SMOL=${SMOL:-data/models/smollm2-135m-instruct}
GGUF=${GGUF:-$(.venv/bin/python -c "from server.model_prep import find_gguf_file; print(find_gguf_file())")}
mkdir -p "$B" "$TMP"
PLAT="--platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
 --platform manylinux1_x86_64 --platform any"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none $PLAT -d "$1" "${@:2}"; }
echo "[gpu-bundle] 1/5 vLLM 0.26.0 wheel -> trimmed tar.xz in two chunks"
if [ ! -f "$B/vllm026.tar.xz.part1" ]; then
  dl "$TMP" vllm==0.26.0
  rm -rf "$TMP/stage" && mkdir "$TMP/stage"
  unzip -q "$TMP"/vllm-0.26.0-*.whl -d "$TMP/stage"
  ( cd "$TMP/stage/vllm"
    # Not needed for a dense Llama-style model on Hopper: FA2 (Hopper runs FA3), the MoE
    # kernels, the opt-in Rust frontend, deep_gemm for other Pythons, a doc image.
    rm -f vllm_flash_attn/_vllm_fa2_C.abi3.so _moe_C_stable_libtorch.abi3.so vllm-rs \
      third_party/deep_gemm/_C.cpython-31[0134]-x86_64-linux-gnu.so \
      distributed/kv_transfer/disagg_prefill_workflow.jpg )
  tar -C "$TMP/stage" --sort=name --owner=0 --group=0 --numeric-owner -cf - vllm vllm-0.26.0.dist-info \
    | xz -9 -T2 > "$TMP/vllm026_trim.tar.xz"
  split -b 42M -d -a 1 "$TMP/vllm026_trim.tar.xz" "$B/vllm026.tar.xz.part"
fi
echo "[gpu-bundle] 2/5 dependency wheels"
rm -rf "$B/deps" "$B/deps_b" && mkdir -p "$B/deps" "$B/deps_b"
dl "$B/deps" -r scripts/gpu/deps.txt
# A call carries at most 64 MiB with the working tree (~16 MB in Dec 2026): the wheels
# travel with vLLM's second chunk (call 4), the three largest in deps_b.
ls -S "$B/deps"/*.whl | head -3 | xargs -I{} mv {} "$B/deps_b/"
echo "[gpu-bundle] 3/5 SmolLM2 GGUF in two equal chunks (each ~49 MB, alone in its call)"
rm -f "$B"/smollm2.gguf.part*
split -n 2 -d -a 1 "$GGUF" "$B/smollm2.gguf.part"
echo "[gpu-bundle] 4/5 Llama-3.1-8B-shaped model directory, fidelity documents"
rm -rf "$B/llama8b" && python3 scripts/gpu/make_llama8b_dir.py "$SMOL" "$B/llama8b"
mkdir -p "$B/docs" && cp /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/GFDL-1.3 "$B/docs/"
echo "[gpu-bundle] 5/5 checksums"
(cd "$B" && sha256sum vllm026.tar.xz.part0 vllm026.tar.xz.part1 smollm2.gguf.part0 smollm2.gguf.part1) > "$B/SHA256SUMS"
du -sb "$B"/vllm026.tar.xz.part* "$B"/smollm2.gguf.part* "$B/deps" "$B/deps_b" "$B/llama8b" "$B/docs"
