"""tessera's attention backend on vLLM's CPU platform (thin glue; the algorithms live elsewhere).

vLLM's CPU platform always selects `CPU_ATTN`, so the plugin points that member at this
class. It keeps vLLM's paged KV layout and cache-write path, and adds one decision per layer:
the layer's pattern from `LayerPatternPolicy`. Dense layers, and every decode step, run
vLLM's own CPU kernel; sparse layers run `kernels.sparse_prefill` on the step's prefill
sequences and vLLM's kernel on its decode sequences.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from attention_backends import leank_cache, prompt_lengths
from attention_backends.dispatch import PrefillDecodeSplit, split_prefill_decode
from attention_backends.vllm_layers import PerLayerPattern, attention_settings, attention_usage
from attention_backends.worker_metrics import DensePoolBytes

BACKEND_NAME = "tessera-cpu"


def _usage():
    return attention_usage(BACKEND_NAME)


@functools.cache
def _dense_pool_bytes() -> DensePoolBytes:
    return DensePoolBytes(attention_settings().stats_dir)


@functools.cache
def key_block_is_dim_major(isa: str, head_size: int, block_size: int, dtype: torch.dtype) -> bool:
    """How vLLM's CPU cache write lays out K inside a block, for this ISA.

    The "vec" kernels keep each head's K block as ``[head_size, block_size]`` (dimension
    major) while V stays ``[block_size, head_size]``; other ISAs may differ. Rather than
    hard-code a table that a vLLM upgrade can silently break, write one probe token with
    vLLM's own op and see where its values land. An unknown layout stops the worker: the
    sparse path must never read keys it misunderstands.
    """
    cache = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    probe = torch.arange(1, head_size + 1, dtype=dtype).view(1, 1, head_size)
    token = 1  # not 0: row and column layouts differ only off the origin
    ops.cpu_attn_reshape_and_cache(
        probe, probe, key_cache, value_cache, torch.tensor([token]), isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
    block = key_cache[0, 0].reshape(-1)
    if torch.equal(block.view(block_size, head_size)[token], probe[0, 0]):
        return False
    if torch.equal(block.view(head_size, block_size)[:, token], probe[0, 0]):
        return True
    raise NotImplementedError(f"unknown CPU K cache layout for ISA {isa!r}")


def logical_key_cache(key_cache: torch.Tensor, dim_major: bool) -> torch.Tensor:
    """A ``[num_blocks, Hkv, block_size, D]`` view of K whatever the physical layout."""
    if not dim_major:
        return key_cache
    num_blocks, num_kv_heads, block_size, head_size = key_cache.shape
    return key_cache.reshape(num_blocks, num_kv_heads, head_size, block_size).transpose(2, 3)


@dataclass
class TesseraCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus the step's prefill/decode split (built once per step)."""

    split: PrefillDecodeSplit | None = None
    decode_scheduler_metadata: torch.Tensor | None = None


class TesseraCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        prompt_lengths.install_runner_hooks()  # the runner publishes each step's prompts
        if attention_settings().retroinfer_min_tokens:
            from attention_backends import retroinfer_decode

            retroinfer_decode.install_runner_hooks()  # ... and its request ids

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if attention_settings().method == "dense" or base.max_query_len <= 1:
            return base  # nothing sparse can run this step: vLLM's metadata, uncopied
        metadata = TesseraCPUAttentionMetadata(**base.__dict__)
        query_start_loc = base.query_start_loc.numpy()
        seq_lens = base.seq_lens.numpy()
        split = split_prefill_decode(
            query_start_loc, seq_lens, base.block_table,
            prompt_lengths.prompt_lens_for_batch(query_start_loc, seq_lens),
        )
        metadata.split = split
        if split.decode is not None:
            metadata.decode_scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=split.decode.num_seqs,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                seq_lens=split.decode.seq_lens,
                dtype=self.dtype,
                query_start_loc=split.decode.query_start_loc,
                causal=True,
                sliding_window_size=self.window_size,
                isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=None,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        return metadata


class TesseraCPUAttentionImpl(PerLayerPattern, CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init_per_layer()
        # LeanK: pages hold pruned K that vLLM's kernel cannot read; leank_cache owns them.
        served = leank_cache.served_leank()
        self.leank = None if served is None else leank_cache.LeanKLayer(served, self.num_heads)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.leank is None:
            _dense_pool_bytes().note(layer, kv_cache, self.num_kv_heads, self.head_size)
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self.leank.write(layer, key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        pattern = self.layer_pattern_of(layer)
        split = getattr(attn_metadata, "split", None)
        usage = _usage()
        # LeanK first: its pages hold pruned K, which neither RetroInfer nor the dense or
        # sparse kernels can read.
        retroinfer_min_tokens = attention_settings().retroinfer_min_tokens
        if (self.leank is None and retroinfer_min_tokens and attn_metadata.max_query_len <= 1
                and self.layer_index >= 0):
            self._forward_retroinfer_decode(layer, query, key, value, kv_cache, attn_metadata,
                                            output, retroinfer_min_tokens, usage,
                                            attention_settings().retroinfer_config())
            self.end_step_if_last(usage)
            return output
        if self.leank is not None:
            # TriangleMix prefill over LeanK's pages: the pattern's per-token mask. Per-head
            # (MInference) patterns estimate from keys LeanK no longer stores: dense prefill.
            sparse = None if pattern.is_dense or not hasattr(pattern, "token_mask") else pattern
            prompt_lens = None if sparse is None else prompt_lengths.prompt_lens_for_batch(
                attn_metadata.query_start_loc.numpy(), attn_metadata.seq_lens.numpy())
            decode_rows, sparse_rows = self.leank.forward(
                layer, query, key, value, kv_cache, attn_metadata, output, sparse, prompt_lens)
            usage.record(self.layer_index, "leank_decode", decode_rows)
            usage.record(self.layer_index, "leank_prefill",
                         attn_metadata.num_actual_tokens - decode_rows)
            if sparse is not None:
                usage.record(self.layer_index, f"leank_prefill_{sparse.name}", sparse_rows)
        elif pattern.is_dense or split is None or split.prefill is None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
            usage.record(self.layer_index, "dense", attn_metadata.num_actual_tokens)
        else:
            self._forward_sparse(layer, query, kv_cache, attn_metadata, output, pattern)
        self.end_step_if_last(usage)
        return output

    def _forward_retroinfer_decode(self, layer, query, key, value, kv_cache, attn_metadata,
                                   output, min_tokens: int, usage, config) -> None:
        """Decode-only step: long sequences through RetroInfer (attention_backends/
        retroinfer_decode.py), the others through vLLM's kernel."""
        from attention_backends import retroinfer_decode

        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        paged = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1)
        key_cache, value_cache = paged.chunk(2, dim=2)
        dim_major = key_block_is_dim_major(layer.isa, self.head_size, block_size, kv_cache.dtype)
        answered = retroinfer_decode.forward_decode_step(
            self.layer_index, query, logical_key_cache(key_cache, dim_major), value_cache,
            attn_metadata, output, self.scale, min_tokens,
            dense=lambda: CPUAttentionBackendImpl.forward(
                self, layer, query, key, value, kv_cache, attn_metadata, output),
            config=config)
        usage.record(self.layer_index, "retroinfer_decode", answered)
        usage.record(self.layer_index, "dense", attn_metadata.num_actual_tokens - answered)

    def _forward_sparse(self, layer, query, kv_cache, attn_metadata, output, pattern) -> None:
        from attention_backends.kernels import sparse_prefill

        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        paged = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1)
        key_cache, value_cache = paged.chunk(2, dim=2)
        dim_major = key_block_is_dim_major(layer.isa, self.head_size, block_size, kv_cache.dtype)
        key_cache_tokens = logical_key_cache(key_cache, dim_major)
        heads_view = output.view(-1, self.num_heads, self.head_size)
        split: PrefillDecodeSplit = attn_metadata.split
        usage = _usage()

        prefill = split.prefill
        # prompt_lens: the whole prompt's length (from the model runner), so only the
        # prompt's real last rows run dense, also when it is prefilled chunk by chunk.
        heads_view[prefill.token_rows] = sparse_prefill(
            query[prefill.token_rows], key_cache_tokens, value_cache, prefill.block_table,
            prefill.query_start_loc, prefill.seq_lens, prefill.prompt_lens, pattern, self.scale,
        ).to(output.dtype)
        self.record_sparse_prefill(usage, prefill)

        decode = split.decode
        if decode is not None:
            decode_out = torch.empty_like(heads_view[decode.token_rows])
            ops.cpu_attention_with_kv_cache(
                query=query[decode.token_rows], key_cache=key_cache, value_cache=value_cache,
                output=decode_out, query_start_loc=decode.query_start_loc,
                seq_lens=decode.seq_lens, scale=self.scale, causal=True,
                alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
                block_table=decode.block_table, softcap=self.logits_soft_cap,
                scheduler_metadata=attn_metadata.decode_scheduler_metadata, s_aux=self.sinks,
                dynamic_causal=None, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype,
            )
            heads_view[decode.token_rows] = decode_out
            usage.record(self.layer_index, "dense", int(decode.token_rows.numel()))


class TesseraCPUBackend(CPUAttentionBackend):
    """Registered over `CPU_ATTN`; `get_name()` stays "CPU_ATTN" as vLLM's enum requires."""

    @classmethod
    def customize_spec(cls, spec):
        return leank_cache.customize_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls() -> type[TesseraCPUAttentionImpl]:
        return TesseraCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TesseraCPUMetadataBuilder]:
        return TesseraCPUMetadataBuilder
