"""Triton decode attention over the paged, pruned K cache (reference: decode_ref.py).

One program per (sequence, query head). It gathers the query's kept channels once (the
kv head's ``kept_index``), then streams the sequence's pages: K tiles are
``[BLOCK_N, BLOCK_K]`` slices of the packed K row (only kept channels are read: this is the
byte saving), V tiles come from the live-head V cache; online softmax in float32. Fully
pruned heads read neither: their output is ``value_sum / seq_len``.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how the unit test checks it here); on
the GPU it is the correctness baseline. Not yet tuned: no split-KV (batch 1 at 128K leaves
most SMs idle), no tensor-core tiles for GQA groups; see ../README.md "Next".
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kv_manager.leank.layout import LayerLayout


@triton.jit
def _pruned_decode_kernel(
    query, k_cache, v_cache, value_sum, block_table, seq_lens,
    k_counts, k_offsets, kept_index, v_slot, sum_slot, out,
    scale, q_heads, group, k_width, live_heads, pruned_heads, max_blocks, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    q_head = tl.program_id(1)
    kv_head = q_head // group
    seq_len = tl.load(seq_lens + seq)
    count = tl.load(k_counts + kv_head)
    dims = tl.arange(0, HEAD_DIM)
    out_row = out + (seq * q_heads + q_head) * HEAD_DIM
    if count == 0:
        slot = tl.load(sum_slot + kv_head)
        total = tl.load(value_sum + (seq * pruned_heads + slot) * HEAD_DIM + dims)
        tl.store(out_row + dims, total / seq_len.to(tl.float32))
    else:
        k_start = tl.load(k_offsets + kv_head)
        v_head = tl.load(v_slot + kv_head)
        kept = tl.arange(0, BLOCK_K)
        kept_ok = kept < count
        channels = tl.load(kept_index + kv_head * HEAD_DIM + kept, mask=kept_ok, other=0)
        q = tl.load(query + (seq * q_heads + q_head) * HEAD_DIM + channels, mask=kept_ok,
                    other=0.0).to(tl.float32)
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            positions = start + tl.arange(0, BLOCK_N)
            valid = positions < seq_len
            blocks = tl.load(block_table + seq * max_blocks + positions // block_size,
                             mask=valid, other=0)
            rows = blocks.to(tl.int64) * block_size + positions % block_size
            k = tl.load(k_cache + rows[:, None] * k_width + k_start + kept[None, :],
                        mask=valid[:, None] & kept_ok[None, :], other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1) * scale
            scores = tl.where(valid, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            correction = tl.exp(running_max - new_max)
            weights = tl.exp(scores - new_max)
            v = tl.load(v_cache + (rows[:, None] * live_heads + v_head) * HEAD_DIM + dims[None, :],
                        mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * correction + tl.sum(weights[:, None] * v, axis=0)
            running_sum = running_sum * correction + tl.sum(weights, axis=0)
            running_max = new_max
        tl.store(out_row + dims, acc / running_sum)


def paged_pruned_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        value_sum: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, layout: LayerLayout,
                        block_n: int = 32) -> torch.Tensor:
    """Same contract as ``decode_ref.paged_pruned_decode_ref``; returns float32."""
    num_seqs, q_heads, head_dim = query.shape
    device = query.device
    out = torch.empty(num_seqs, q_heads, head_dim, dtype=torch.float32, device=device)
    block_k = max(16, triton.next_power_of_2(max(layout.max_kept, 1)))
    value_sum = value_sum if value_sum.numel() else torch.zeros(num_seqs, 1, head_dim,
                                                                device=device)
    _pruned_decode_kernel[(num_seqs, q_heads)](
        query.contiguous(), k_cache, v_cache, value_sum.float().contiguous(),
        block_table.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(),
        layout.k_counts.to(device), layout.k_offsets.to(device), layout.kept_index.to(device),
        layout.v_slot.to(device), layout.sum_slot.to(device), out,
        1.0 / math.sqrt(head_dim), q_heads, q_heads // layout.num_kv_heads, layout.k_width,
        max(len(layout.live_heads), 1), value_sum.shape[1], block_table.shape[1],
        k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return out
