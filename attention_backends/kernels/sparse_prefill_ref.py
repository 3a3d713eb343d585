"""Sparse prefill attention over a paged KV cache, in plain torch.

The oracle for the Triton kernel and the production path on CPU (vLLM's CPU worker). It
works one block of query rows at a time and gathers only the key intervals the pattern can
keep for that block (``pattern.key_ranges``), then applies the per-token mask
(``pattern.token_mask``) on that small ``[rows, gathered keys]`` tile: memory stays
``O(rows x kept span x heads)``, never ``T x T``.
"""

from __future__ import annotations

import torch

from attention_backends.patterns import AttentionPattern


def gather_sequence_kv(
    cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Token-ordered K (or V) of one sequence from a paged cache.

    cache: ``[num_blocks, Hkv, block_size, D]`` (any strides). block_table_row: int
    ``[max_blocks]``. Returns a new contiguous ``[seq_len, Hkv, D]`` tensor, same dtype.
    """
    block_size = cache.shape[2]
    num_seq_blocks = -(-seq_len // block_size)
    physical_blocks = block_table_row[:num_seq_blocks].long()
    blocks = cache[physical_blocks]  # [n, Hkv, block_size, D], copies only this sequence
    num_kv_heads, head_dim = blocks.shape[1], blocks.shape[3]
    tokens = blocks.permute(0, 2, 1, 3).reshape(num_seq_blocks * block_size, num_kv_heads, head_dim)
    return tokens[:seq_len]


def _attend_rows(
    query_rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked softmax attention for a tile, GQA without repeating K/V.

    query_rows ``[R, Hq, D]``, keys/values ``[K, Hkv, D]``, keep bool ``[R, K]``.
    Returns ``[R, Hq, D]`` in the compute dtype of the inputs.
    """
    num_rows, num_q_heads, head_dim = query_rows.shape
    num_kv_heads = keys.shape[1]
    group = num_q_heads // num_kv_heads
    grouped_q = query_rows.view(num_rows, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    scores = torch.matmul(grouped_q, keys.permute(1, 2, 0).unsqueeze(1)) * scale  # [Hkv,G,R,K]
    scores.masked_fill_(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attended = torch.matmul(probs, values.permute(1, 0, 2).unsqueeze(1))  # [Hkv, G, R, D]
    return attended.permute(2, 0, 1, 3).reshape(num_rows, num_q_heads, head_dim)


def sparse_prefill_ref(
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
    query_block_tokens: int = 128,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pattern-masked causal attention for packed prefill queries over a paged KV cache.

    query: ``[T, Hq, D]`` new tokens of all sequences, back to back.
    key_cache / value_cache: ``[num_blocks, Hkv, block_size, D]`` (strided views allowed);
    the new tokens' K/V are already written. block_table: int32 ``[num_seqs, max_blocks]``.
    query_start_loc: int32 ``[num_seqs + 1]``. seq_lens: int32 ``[num_seqs]`` tokens in the
    cache after this step. prompt_lens: int32 ``[num_seqs]`` full prompt lengths.
    Query ``i`` of sequence ``s`` is at absolute position ``seq_lens[s] - query_len + i``.
    compute_dtype: float32 by default for half inputs (accuracy), else the input dtype.
    Returns ``out`` (``[T, Hq, D]``, query dtype), written in place when given.
    """
    if out is None:
        out = torch.empty_like(query)
    if compute_dtype is None:
        compute_dtype = (
            torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        )
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    prompts = prompt_lens.tolist()
    for seq_index in range(len(lengths)):
        query_begin, query_end = starts[seq_index], starts[seq_index + 1]
        query_len = query_end - query_begin
        if query_len == 0:
            continue
        seq_len, prompt_len = lengths[seq_index], prompts[seq_index]
        first_pos = seq_len - query_len
        seq_keys = gather_sequence_kv(key_cache, block_table[seq_index], seq_len).to(compute_dtype)
        seq_values = gather_sequence_kv(value_cache, block_table[seq_index], seq_len).to(
            compute_dtype
        )
        for row_begin in range(0, query_len, query_block_tokens):
            row_end = min(row_begin + query_block_tokens, query_len)
            first_row_pos, last_row_pos = first_pos + row_begin, first_pos + row_end - 1
            ranges = pattern.key_ranges(first_row_pos, last_row_pos, prompt_len)
            key_positions = torch.cat([torch.arange(lo, hi) for lo, hi in ranges])
            if len(ranges) == 1:  # contiguous: a view, no gather
                lo, hi = ranges[0]
                keys, values = seq_keys[lo:hi], seq_values[lo:hi]
            else:
                gather_index = key_positions.to(seq_keys.device)
                keys, values = seq_keys[gather_index], seq_values[gather_index]
            query_positions = torch.arange(first_row_pos, last_row_pos + 1)
            keep = pattern.token_mask(query_positions, key_positions, prompt_len)
            rows = query[query_begin + row_begin : query_begin + row_end].to(compute_dtype)
            attended = _attend_rows(rows, keys, values, keep.to(rows.device), scale)
            out[query_begin + row_begin : query_begin + row_end] = attended.to(out.dtype)
    return out
