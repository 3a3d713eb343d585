"""tessera's attention backend on vLLM's CUDA platform (thin glue; vLLM 0.26).

Registered as vLLM's ``CUSTOM`` backend (served with ``--attention-backend CUSTOM``; the
``tessera worker`` launcher passes it on CUDA). It is vLLM's FlashAttention backend with one
decision per layer: dense layers, and every step without a prefill, run FlashAttention
exactly as vLLM does (decode CUDA graphs are still captured through this class); in sparse
layers the step's prefill rows run ``kernels.sparse_prefill`` (the Gluon/Triton kernels)
and its decode rows FlashAttention on their own sub-batch. vLLM writes the new tokens' K/V
into the cache before ``forward`` (``forward_includes_kv_cache_update`` is False), so both
read the same paged cache: ``[num_blocks, Hkv, block_size, 2 * D]``, K and V side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backends import flash_attn as vllm_flash_attn
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from attention_backends import prompt_lengths
from attention_backends.dispatch import (
    PrefillDecodeSplit,
    SubBatch,
    pattern_for_sub_batch,
    split_prefill_decode,
)
from attention_backends.vllm_layers import PerLayerPattern, attention_settings, attention_usage

BACKEND_NAME = "tessera-cuda"
# The Gluon streaming kernel needs cache blocks holding whole 64-key tiles
# (benchmarks/trianglemix_NOTES.md); vLLM's default block is 16 tokens.
TRIANGLEMIX_BLOCK_SIZE = 64


def _usage():
    return attention_usage(BACKEND_NAME)


@dataclass
class TesseraFlashAttentionMetadata(FlashAttentionMetadata):
    """vLLM's FlashAttention metadata plus the step's prefill/decode split."""

    split: PrefillDecodeSplit | None = None


class TesseraFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        prompt_lengths.install_runner_hooks()  # the runner publishes each step's prompts

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if attention_settings().method == "dense" or base.max_query_len <= 1:
            # Decode-only steps (and their CUDA graphs) get vLLM's own metadata, with no copy
            # (ITL was measured 2.4% above FA3's while every step copied it; NOTES session 4).
            return base
        metadata = TesseraFlashAttentionMetadata(**base.__dict__)
        num_reqs = common_attn_metadata.num_reqs
        query_start_loc = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].numpy()
        seq_lens = common_attn_metadata.seq_lens_cpu_upper_bound  # exact for prefill rows
        if seq_lens is None:
            seq_lens = common_attn_metadata.seq_lens.cpu()
        seq_lens = seq_lens[:num_reqs].numpy()
        metadata.split = split_prefill_decode(
            query_start_loc, seq_lens, base.block_table[:num_reqs],
            prompt_lengths.prompt_lens_for_batch(query_start_loc, seq_lens),
        )
        return metadata


def kernel_launch_config(settings, key_cache: torch.Tensor, value_cache: torch.Tensor):
    """None (the kernel picks its measured best) unless ``settings`` override it."""
    if settings.kernel_overlap_last_rows and settings.kernel_streaming == "auto":
        return None
    from attention_backends.kernels.sparse_prefill_triton import default_config, with_overrides

    return with_overrides(default_config(key_cache, value_cache),
                          settings.kernel_overlap_last_rows, settings.kernel_streaming)


def _rows(tensor: torch.Tensor, sub: SubBatch) -> torch.Tensor:
    if sub.row_range is not None:
        return tensor[sub.row_range[0] : sub.row_range[1]]
    return tensor[sub.token_rows]


class TesseraFlashAttentionImpl(PerLayerPattern, FlashAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init_per_layer()

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FlashAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        split = getattr(attn_metadata, "split", None)
        if split is None or split.prefill is None:
            # Profile runs, CUDA-graph capture and decode-only steps: vLLM's own path, with
            # nothing added (these are the replayed graphs).
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        pattern = self.layer_pattern_of(layer)
        usage = _usage()
        if pattern.is_dense:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
            usage.record(self.layer_index, "dense", attn_metadata.num_actual_tokens)
        else:
            self._forward_sparse(layer, query, kv_cache, attn_metadata, output, split)
        self.end_step_if_last(usage)
        return output

    def _launch_config(self, key_cache: torch.Tensor, value_cache: torch.Tensor):
        """The kernel's launch config: its own measured best unless the settings override
        the side-stream overlap or the streaming kernel (issue 18's decode-ITL variants).
        Decided once per layer: the cache's layout never changes while serving."""
        if not hasattr(self, "_kernel_config"):
            self._kernel_config = kernel_launch_config(attention_settings(), key_cache,
                                                       value_cache)
        return self._kernel_config

    def _forward_sparse(self, layer, query, kv_cache, attn_metadata, output, split) -> None:
        from attention_backends.kernels import sparse_prefill

        pattern = self.pattern
        usage = _usage()
        heads_out = output.view(-1, self.num_heads, self.head_size)
        # [num_blocks, Hkv, block_size, D] views of K and V (unit stride on D)
        key_cache, value_cache = kv_cache[..., : self.head_size], kv_cache[..., self.head_size :]

        prefill = split.prefill
        prefill_out = _rows(heads_out, prefill) if prefill.row_range is not None else None
        result = sparse_prefill(
            _rows(query, prefill), key_cache, value_cache, prefill.block_table,
            prefill.query_start_loc, prefill.seq_lens, prefill.prompt_lens,
            pattern_for_sub_batch(pattern, prefill), self.scale, out=prefill_out,
            config=self._launch_config(key_cache, value_cache),
        )  # fmt: skip
        if prefill_out is None:
            heads_out[prefill.token_rows] = result
        self.record_sparse_prefill(usage, prefill)

        decode = split.decode
        if decode is None:
            return
        # The step's decode rows: FlashAttention over their own sub-batch, as vLLM's forward
        # would compute them (no AOT schedule: it was planned for the whole batch).
        fa_key, fa_value = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        decode_out = _rows(heads_out, decode) if decode.row_range is not None else None
        decode_query = _rows(query, decode)
        target = decode_out if decode_out is not None else torch.empty_like(decode_query)
        vllm_flash_attn.flash_attn_varlen_func(
            q=decode_query, k=fa_key, v=fa_value, out=target,
            cu_seqlens_q=decode.query_start_loc, max_seqlen_q=1,
            seqused_k=decode.seq_lens, max_seqlen_k=int(decode.seq_lens_host.max()),
            softmax_scale=self.scale, causal=True, window_size=[-1, -1],
            block_table=decode.block_table, softcap=0.0,
            fa_version=self.vllm_flash_attn_version,
        )  # fmt: skip
        if decode_out is None:
            heads_out[decode.token_rows] = target
        usage.record(self.layer_index, "dense", decode.num_seqs)


class TesseraFlashAttentionBackend(FlashAttentionBackend):
    """Registered as ``CUSTOM``; its KV layout and cache writes are FlashAttention's."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[TesseraFlashAttentionImpl]:
        return TesseraFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TesseraFlashAttentionMetadataBuilder]:
        return TesseraFlashAttentionMetadataBuilder

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # Unless --block-size is given: TriangleMix runs its Gluon kernel on 64-token blocks.
        if attention_settings().method == "trianglemix":
            return max(default_block_size, TRIANGLEMIX_BLOCK_SIZE)
        return super().get_preferred_block_size(default_block_size)
