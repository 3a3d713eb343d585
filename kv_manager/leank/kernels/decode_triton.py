"""Triton decode attention over the paged, pruned K cache (reference: decode_ref.py).

Grid: (sequence, KV head, KV split). A program serves all ``group`` query heads of its KV
head, so each kept K channel is read once per GQA group (not once per query head): it
gathers the group's query channels once (``kept_index``), streams its share of the
sequence's pages as ``[BLOCK_N, BLOCK_K]`` tiles of the packed K row (only kept channels are
read: the byte saving) and ``[BLOCK_N, head_dim]`` V tiles, and keeps an online softmax in
float32. Splits (flash-decoding) give a long, small batch enough programs; their partial
results (max, sum, unnormalised output) are merged by ``_merge_splits``. Fully pruned heads
read neither K nor V: their output is ``value_sum / seq_len``.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how the unit test checks it here). Not yet
timed on the GPU; see ../README.md "Next".
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
    k_counts, k_offsets, kept_index, v_slot, sum_slot,
    part_out, part_max, part_sum,
    scale, q_heads, group, k_width, live_heads, pruned_heads, max_blocks, block_size,
    tokens_per_split, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    count = tl.load(k_counts + kv_head)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * group + tl.arange(0, BLOCK_G)
    head_ok = tl.arange(0, BLOCK_G) < group
    # Partial results are indexed [seq, q_head, split]; a split with no tokens writes
    # max = -inf, sum = 0 so the merge ignores it.
    part_row = (seq * q_heads + heads) * num_splits + split
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, seq_len)
    if count == 0:
        slot = tl.load(sum_slot + kv_head)
        total = tl.load(value_sum + (seq * pruned_heads + slot) * HEAD_DIM + dims)
        mean = total / seq_len.to(tl.float32)
        # Only split 0 reports; with max 0 and sum 1 the merge returns the mean unchanged.
        first = split == 0
        out = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32) + mean[None, :]
        tl.store(part_out + part_row[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=head_ok[:, None])
        tl.store(part_max + part_row, tl.where(first, 0.0, float("-inf")), mask=head_ok)
        tl.store(part_sum + part_row, tl.where(first, 1.0, 0.0), mask=head_ok)
    else:
        k_start = tl.load(k_offsets + kv_head)
        v_head = tl.load(v_slot + kv_head)
        kept = tl.arange(0, BLOCK_K)
        kept_ok = kept < count
        channels = tl.load(kept_index + kv_head * HEAD_DIM + kept, mask=kept_ok, other=0)
        q = tl.load(query + heads[:, None] * HEAD_DIM + seq * q_heads * HEAD_DIM
                    + channels[None, :], mask=head_ok[:, None] & kept_ok[None, :], other=0.0)
        running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
        for tile in range(start, stop, BLOCK_N):
            positions = tile + tl.arange(0, BLOCK_N)
            valid = positions < stop
            blocks = tl.load(block_table + seq * max_blocks + positions // block_size,
                             mask=valid, other=0)
            rows = blocks.to(tl.int64) * block_size + positions % block_size
            k = tl.load(k_cache + rows[:, None] * k_width + k_start + kept[None, :],
                        mask=valid[:, None] & kept_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp(running_max - new_max)
            weights = tl.exp(scores - new_max[:, None])
            v = tl.load(v_cache + (rows[:, None] * live_heads + v_head) * HEAD_DIM + dims[None, :],
                        mask=valid[:, None], other=0.0)
            acc = acc * correction[:, None] + tl.dot(weights.to(v.dtype), v,
                                                     input_precision=PRECISION)
            running_sum = running_sum * correction + tl.sum(weights, axis=1)
            running_max = new_max
        tl.store(part_out + part_row[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=head_ok[:, None])
        tl.store(part_max + part_row, running_max, mask=head_ok)
        tl.store(part_sum + part_row, running_sum, mask=head_ok)


def _merge_splits(part_out: torch.Tensor, part_max: torch.Tensor,
                  part_sum: torch.Tensor) -> torch.Tensor:
    """[seqs, heads, splits, d], [seqs, heads, splits] x2 -> [seqs, heads, d] float32."""
    best = part_max.amax(dim=2, keepdim=True)
    weight = torch.exp(part_max - best)  # empty splits: exp(-inf) = 0
    total = (part_sum * weight).sum(dim=2)
    return (part_out * weight.unsqueeze(-1)).sum(dim=2) / total.unsqueeze(-1)


def paged_pruned_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        value_sum: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, layout: LayerLayout, block_n: int = 32,
                        tokens_per_split: int = 512) -> torch.Tensor:
    """Same contract as ``decode_ref.paged_pruned_decode_ref``; returns float32.
    ``tokens_per_split`` is rounded up to a multiple of ``block_n``."""
    num_seqs, q_heads, head_dim = query.shape
    device = query.device
    group = q_heads // layout.num_kv_heads
    tokens_per_split = -(-tokens_per_split // block_n) * block_n
    num_splits = max(1, -(-int(seq_lens.max()) // tokens_per_split))
    part_out = torch.empty(num_seqs, q_heads, num_splits, head_dim, dtype=torch.float32,
                           device=device)
    part_max = torch.empty(num_seqs, q_heads, num_splits, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    value_sum = value_sum if value_sum.numel() else torch.zeros(num_seqs, 1, head_dim,
                                                                device=device)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _pruned_decode_kernel[(num_seqs, layout.num_kv_heads, num_splits)](
        query.contiguous(), k_cache, v_cache, value_sum.float().contiguous(),
        block_table.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(),
        layout.k_counts.to(device), layout.k_offsets.to(device), layout.kept_index.to(device),
        layout.v_slot.to(device), layout.sum_slot.to(device),
        part_out, part_max, part_sum,
        1.0 / math.sqrt(head_dim), q_heads, group, layout.k_width,
        max(len(layout.live_heads), 1), value_sum.shape[1], block_table.shape[1],
        k_cache.shape[1], tokens_per_split, num_splits,
        HEAD_DIM=head_dim, BLOCK_K=max(16, triton.next_power_of_2(max(layout.max_kept, 1))),
        BLOCK_N=block_n, BLOCK_G=max(16, triton.next_power_of_2(group)), PRECISION=precision,
    )
    return _merge_splits(part_out, part_max, part_sum)
