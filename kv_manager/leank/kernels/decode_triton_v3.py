"""LeanK decode kernel v3, kept beside v4 (``decode_triton.py``) so the benchmark can time
both in the same rounds; v3 measured 1.62-1.67x dense on the H200 at batch 32 and 8/128K
(benchmarks/leank_NOTES.md). Reference: decode_ref.py.

Grid: (KV head, sequence, KV split); the KV head varies fastest, so the programs that read
the same pages run side by side. A program serves all ``group`` query heads of its KV head,
so each kept K channel is read once per GQA group: it gathers the group's query channels
once (``kept_index``), streams its share of the sequence in ``[BLOCK_N, BLOCK_K]`` tiles of
the packed K row (only kept channels are read: the byte saving) and ``[BLOCK_N, head_dim]``
V tiles, several pages per tile through the block table, and keeps an online softmax in
float32 (base 2). Splits (flash-decoding) give a long, small batch enough programs; their
partials (max, sum, unnormalised output) are merged by ``_merge_splits_kernel``. Fully
pruned heads read neither K nor V: their output is ``value_sum / seq_len``.

v3 (the v2 kernel, in git history before it, measured 0.51-0.53x dense SDPA on the H200 at
~1.2 TB/s): v2's K tile was read with 2-byte loads (its column offset and column mask were
runtime values, so the compiler could not prove 16-byte alignment), and a load that is not
at least 4 bytes wide cannot become an async copy, so the software pipeline waited on K in
every iteration. v3 tells the compiler what the layout guarantees: each head's K offset is a
multiple of ``KEPT_ALIGN`` (the mask's alignment, checked on the host) and the column mask
is constant over ``KEPT_ALIGN`` columns. K then loads as 16-byte async copies like V, and
with the next tile's page ids loaded a tile ahead both get ``num_stages - 1`` buffers (v2:
one V buffer). Also: 64-token tiles (4 pages), the page size a
compile-time constant (shifts, not divisions), exp2, the split count sized to the device
(``default_tokens_per_split``), and a merge that is parallel over head_dim chunks and loops
over splits in bounded chunks (v2 held every split of a row in registers at once).

No host work per call that syncs: the layout's tables are cached on the device per layout,
the split count comes from host-known sizes (the block table's width or ``max_seq_len``),
and splits past a sequence's end write an empty partial that the merge skips. K and V are
read through their strides, so vLLM's packed page views (``[K kept | V live]`` in one row)
work without a copy.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how the unit test checks it here).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kv_manager.leank.kernels.decode_triton import (
    _longest,
    _multiprocessors,
    device_layout,
    num_splits_for,
)
from kv_manager.leank.layout import LayerLayout

LOG2E = 1.4426950408889634


@triton.jit
def _pruned_decode_kernel(
    query,
    k_cache,
    v_cache,
    value_sum,
    block_table,
    seq_lens,
    k_counts,
    k_offsets,
    kept_index,
    v_slot,
    sum_slot,
    part_out,
    part_max,
    part_sum,
    scale_log2,
    q_heads,
    group,
    pruned_heads,
    max_blocks,
    k_block_stride,
    k_token_stride,
    v_block_stride,
    v_token_stride,
    v_head_stride,
    tokens_per_split,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PAGE: tl.constexpr,
    KEPT_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    count = tl.load(k_counts + kv_head)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * group + tl.arange(0, BLOCK_G)
    head_ok = tl.arange(0, BLOCK_G) < group
    # Partials are indexed [seq, q_head, split]; a split with no tokens writes max = -inf,
    # sum = 0 so the merge ignores it.
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
        tl.store(
            part_out + part_row[:, None] * HEAD_DIM + dims[None, :], out, mask=head_ok[:, None]
        )
        tl.store(part_max + part_row, tl.where(first, 0.0, float("-inf")), mask=head_ok)
        tl.store(part_sum + part_row, tl.where(first, 1.0, 0.0), mask=head_ok)
    else:
        # The layout guarantees (host-checked): counts and offsets are multiples of
        # KEPT_ALIGN. Saying so lets the K tile load as 16-byte vectors (async copies).
        k_start = tl.multiple_of(tl.load(k_offsets + kv_head), KEPT_ALIGN)
        v_head = tl.load(v_slot + kv_head)
        kept = tl.arange(0, BLOCK_K)
        # Same truth value as kept < count, but constant over KEPT_ALIGN columns, so the
        # mask does not split a vector.
        kept_ok = (kept // KEPT_ALIGN) < (count // KEPT_ALIGN)
        channels = tl.load(kept_index + kv_head * HEAD_DIM + kept, mask=kept_ok, other=0)
        q = tl.load(
            query + heads[:, None] * HEAD_DIM + seq * q_heads * HEAD_DIM + channels[None, :],
            mask=head_ok[:, None] & kept_ok[None, :],
            other=0.0,
        )
        running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
        table_row = block_table + seq * max_blocks
        v_base = v_cache + v_head * v_head_stride
        # The next tile's page ids are loaded one iteration ahead into registers: K and V
        # addresses then depend on no load of their own iteration, so the pipeliner gives
        # K and V num_stages - 1 buffers (with the page load inside the iteration, the
        # chain page -> K/V used up a stage and left one buffer: one tile in flight).
        positions = start + tl.arange(0, BLOCK_N)
        next_pages = tl.load(table_row + positions // PAGE, mask=positions < stop, other=0)
        for tile in range(start, stop, BLOCK_N):
            positions = tile + tl.arange(0, BLOCK_N)
            valid = positions < stop
            pages = next_pages.to(tl.int64)
            ahead = positions + BLOCK_N
            next_pages = tl.load(table_row + ahead // PAGE, mask=ahead < stop, other=0)
            offsets = positions % PAGE
            k_rows = pages * k_block_stride + offsets * k_token_stride + k_start
            k = tl.load(
                k_cache + k_rows[:, None] + kept[None, :],
                mask=valid[:, None] & kept_ok[None, :],
                other=0.0,
            )
            v_rows = pages * v_block_stride + offsets * v_token_stride
            v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp2(running_max - new_max)
            weights = tl.exp2(scores - new_max[:, None])
            acc = acc * correction[:, None] + tl.dot(
                weights.to(v.dtype), v, input_precision=PRECISION
            )
            running_sum = running_sum * correction + tl.sum(weights, axis=1)
            running_max = new_max
        tl.store(
            part_out + part_row[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None]
        )
        tl.store(part_max + part_row, running_max, mask=head_ok)
        tl.store(part_sum + part_row, running_sum, mask=head_ok)


@triton.jit
def _merge_splits_kernel(
    part_out,
    part_max,
    part_sum,
    out,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid (sequence x query head, head_dim / BLOCK_D): the softmax-weighted sum of the
    row's splits (maxima in base 2), BLOCK_S splits at a time with a running maximum."""
    row = tl.program_id(0)  # seq * q_heads + q_head
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    best = float("-inf")
    total = 0.0
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        split_ok = splits < num_splits
        maxes = tl.load(part_max + row * num_splits + splits, mask=split_ok, other=float("-inf"))
        sums = tl.load(part_sum + row * num_splits + splits, mask=split_ok, other=0.0)
        partial = tl.load(
            part_out + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
            mask=split_ok[:, None],
            other=0.0,
        )
        new_best = tl.maximum(best, tl.max(maxes, axis=0))
        # Every split so far empty: keep the reference finite so no inf - inf appears.
        anchor = tl.where(new_best > float("-inf"), new_best, 0.0)
        correction = tl.exp2(best - anchor)
        weight = tl.where(maxes > float("-inf"), tl.exp2(maxes - anchor), 0.0)
        acc = acc * correction + tl.sum(partial * weight[:, None], axis=0)
        total = total * correction + tl.sum(sums * weight, axis=0)
        best = new_best
    tl.store(out + row * HEAD_DIM + dims, acc / total)


def default_tokens_per_split_v3(
    num_seqs: int,
    kv_heads: int,
    longest: int,
    block_n: int,
    device: torch.device,
    programs_per_sm: int = 8,
    min_tiles: int = 4,
    max_tiles: int = 64,
) -> int:
    """Tokens per split: about ``programs_per_sm`` programs per SM for a small batch (2-4
    are resident at a time, so later programs fill the SMs whose first ones finish early),
    each at least ``min_tiles`` tiles (a pipelined loop needs a few iterations) and at most
    ``max_tiles`` (long programs leave a long tail when the last ones run alone). The splits
    of a sequence are equal to within a tile (no short last split)."""
    wanted = programs_per_sm * _multiprocessors(device)
    splits = max(-(-wanted // (num_seqs * kv_heads)), -(-longest // (max_tiles * block_n)))
    splits = max(1, min(splits, longest // (min_tiles * block_n)))
    return -(-longest // (splits * block_n)) * block_n


def paged_pruned_decode_v3(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    value_sum: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: LayerLayout,
    block_n: int = 64,
    tokens_per_split: int | None = None,
    max_seq_len: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Same contract as ``decode_ref.paged_pruned_decode_ref``; returns float32.

    ``k_cache`` [blocks, block_size, >= k_width] and ``v_cache`` [blocks, block_size,
    live_heads, head_dim] may be strided views (last dim contiguous); ``block_table`` int32
    and ``seq_lens`` int32 on the device; ``value_sum`` float32. ``tokens_per_split`` (None:
    ``default_tokens_per_split``) is rounded up to a multiple of ``block_n``."""
    num_seqs, q_heads, head_dim = query.shape
    device = query.device
    tables = device_layout(layout, device)
    group = q_heads // layout.num_kv_heads
    block_size = k_cache.shape[1]
    if tokens_per_split is None:
        tokens_per_split = default_tokens_per_split_v3(
            num_seqs,
            layout.num_kv_heads,
            _longest(block_table, block_size, max_seq_len),
            block_n,
            device,
        )
    tokens_per_split = -(-tokens_per_split // block_n) * block_n
    num_splits = num_splits_for(block_table, block_size, tokens_per_split, max_seq_len)
    part_out = torch.empty(
        num_seqs, q_heads, num_splits, head_dim, dtype=torch.float32, device=device
    )
    part_max = torch.empty(num_seqs, q_heads, num_splits, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    # No pruned head: the kernel never reads value_sum; any float32 pointer will do.
    value_sum = value_sum if value_sum.numel() else part_max
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _pruned_decode_kernel[(layout.num_kv_heads, num_seqs, num_splits)](
        query.contiguous(),
        k_cache,
        v_cache,
        value_sum,
        block_table.to(torch.int32),
        seq_lens.to(torch.int32),
        tables.k_counts,
        tables.k_offsets,
        tables.kept_index,
        tables.v_slot,
        tables.sum_slot,
        part_out,
        part_max,
        part_sum,
        LOG2E / math.sqrt(head_dim),
        q_heads,
        group,
        max(value_sum.shape[1], 1),
        block_table.shape[1],
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        tokens_per_split,
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_K=max(16, triton.next_power_of_2(max(tables.max_kept, 1))),
        BLOCK_N=block_n,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        PAGE=block_size,
        KEPT_ALIGN=tables.kept_align,
        PRECISION=precision,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    out = torch.empty(num_seqs, q_heads, head_dim, dtype=torch.float32, device=device)
    block_d = min(32, head_dim)
    _merge_splits_kernel[(num_seqs * q_heads, head_dim // block_d)](
        part_out,
        part_max,
        part_sum,
        out,
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=min(64, triton.next_power_of_2(num_splits)),
    )
    return out
