"""Torch reference: decode attention over a paged, pruned KV cache (one layer).

Cache layout (what the vLLM integration will allocate per layer; see ../README.md):
- ``k_cache``  [num_blocks, block_size, k_width]: each token's kept K channels, all KV heads
  packed (LayerLayout.k_offsets says where each head starts);
- ``v_cache``  [num_blocks, block_size, live_heads, head_dim]: V of heads that keep any
  channel;
- ``value_sum`` float32 [num_seqs, pruned_heads, head_dim]: running V sum of fully pruned
  heads (their attention is uniform, so the output is value_sum / seq_len);
- ``block_table`` int32 [num_seqs, max_blocks], ``seq_lens`` int32 [num_seqs], as in vLLM.
"""

from __future__ import annotations

import torch

from kv_manager.leank.apply import live_values, prune_keys, pruned_decode_attention
from kv_manager.leank.layout import LayerLayout


def write_pruned_tokens(
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: LayerLayout,
) -> None:
    """The cache write: keys/values [tokens, kv_heads, head_dim] (post-RoPE keys) go to flat
    slots ``slot_mapping`` [tokens] (block * block_size + offset), pruned on the way in."""
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = prune_keys(keys, layout).to(k_cache.dtype)
    v_cache[blocks, offsets] = live_values(values, layout).to(v_cache.dtype)


def gather_sequence(cache: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` token rows of one sequence from a paged cache."""
    block_size = cache.shape[1]
    positions = torch.arange(seq_len, device=cache.device)
    return cache[block_row[positions // block_size].long(), positions % block_size]


def paged_pruned_decode_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    value_sum: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: LayerLayout,
) -> torch.Tensor:
    """query [num_seqs, q_heads, head_dim] -> float32 [num_seqs, q_heads, head_dim]."""
    outputs = []
    for seq, seq_len in enumerate(seq_lens.tolist()):
        packed_keys = gather_sequence(k_cache, block_table[seq], seq_len)
        values = gather_sequence(v_cache, block_table[seq], seq_len)
        outputs.append(
            pruned_decode_attention(query[seq], packed_keys, values, value_sum[seq], layout)
        )
    return torch.stack(outputs)
