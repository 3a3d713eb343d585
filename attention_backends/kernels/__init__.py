"""Sparse-prefill attention kernels: a torch reference and a Triton GPU kernel.

``sparse_prefill`` is what the attention backend calls: the Triton kernel for CUDA tensors,
the torch reference otherwise (vLLM's CPU worker). Both compute the same per-token function
(see ``attention_backends/patterns``). Importing this package never imports triton.
"""

from __future__ import annotations

import torch

from attention_backends.kernels.sparse_prefill_ref import sparse_prefill_ref
from attention_backends.patterns import AttentionPattern


def sparse_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    pattern: AttentionPattern,
    scale: float,
    out: torch.Tensor | None = None,
    config=None,
) -> torch.Tensor:
    """Pattern-masked causal prefill attention over a paged KV cache.

    query ``[T, Hq, D]`` (new tokens of all sequences, packed); key_cache / value_cache
    ``[num_blocks, Hkv, block_size, D]`` (strided views allowed, new tokens already written);
    block_table int32 ``[num_seqs, max_blocks]``; query_start_loc int32 ``[num_seqs + 1]``;
    seq_lens int32 ``[num_seqs]`` (cached + new tokens); prompt_lens int32 ``[num_seqs]``
    (whole prompt, decides the last-q rows). Query ``i`` of sequence ``s`` sits at absolute
    position ``seq_lens[s] - query_len_s + i``. Returns ``[T, Hq, D]`` (``out`` if given).
    ``config``: the GPU kernel's ``LaunchConfig`` (None: the measured best for the cache).
    """
    if not hasattr(pattern, "key_ranges"):
        # a per-head pattern (patterns/minference: LayerHeadPatterns): the Triton kernel on
        # CUDA where it takes the shapes (tests/gpu/test_head_sparse_triton.py), else the
        # torch reference (the CPU worker's path).
        if query.is_cuda:
            from attention_backends.kernels.head_sparse_triton import (
                head_sparse_prefill_triton,
                head_sparse_supported,
            )

            if head_sparse_supported(query, key_cache):
                return head_sparse_prefill_triton(
                    query, key_cache, value_cache, block_table, query_start_loc,
                    seq_lens, prompt_lens, pattern, scale, out,
                )  # fmt: skip
        from attention_backends.kernels.head_sparse_ref import head_sparse_prefill_ref

        return head_sparse_prefill_ref(
            query, key_cache, value_cache, block_table, query_start_loc,
            seq_lens, prompt_lens, pattern, scale, out,
        )  # fmt: skip
    if query.is_cuda:
        from attention_backends.kernels.sparse_prefill_triton import sparse_prefill_triton

        return sparse_prefill_triton(
            query, key_cache, value_cache, block_table, query_start_loc,
            seq_lens, prompt_lens, pattern, scale, out, config,
        )  # fmt: skip
    return sparse_prefill_ref(
        query, key_cache, value_cache, block_table, query_start_loc,
        seq_lens, prompt_lens, pattern, scale, out,
    )  # fmt: skip


__all__ = ["sparse_prefill", "sparse_prefill_ref"]
