"""Per-head sparse prefill in Triton: the first GPU path for ``patterns/minference``.

A program owns one (query tile, query head) of one sequence and walks the ``KernelPlan``:
first the listed key tiles (loaded whole, masked per token with the index's four sets, so the
result is exactly ``HeadsIndex.keep_mask``), then the gathered columns in groups of ``TILE``
keys, with one online softmax over both. K/V are read through the block table per key (the
gather layout of ``sparse_prefill_triton``'s 16-token-block path), so any cache block size
works. Correctness first: checked against the torch reference with ``TRITON_INTERPRET=1`` on
CPU. Not yet done (GPU session): GQA-packed programs sharing K/V tiles, TMA tile loads for
64-token cache blocks, a varlen launch instead of one launch per sequence, timing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention_backends.kernels.head_sparse_plan import make_plan
from attention_backends.kernels.sparse_prefill_ref import gather_sequence_kv
from attention_backends.patterns.minference.index import SequenceChunk


@triton.jit
def _online_update(q, k, v, keep, m_i, l_i, acc, scale):
    scores = tl.dot(q, tl.trans(k)) * scale
    scores = tl.where(keep, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    probs = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _head_sparse_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr,
    tile_count_ptr, tile_index_ptr, column_count_ptr, column_index_ptr,
    columns_ptr, diagonals_ptr, full_rows_ptr, blocks_ptr,
    first_pos, seq_len, first_query_tile, num_query_tiles, num_tiles, scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    max_tiles, max_columns, num_tokens_index,
    GROUP: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    slot = tl.program_id(0)  # query tile, relative to first_query_tile
    head = tl.program_id(1)
    kv_head = head // GROUP
    query_tile = first_query_tile + slot
    offs_m = query_tile * TILE + tl.arange(0, TILE)  # absolute positions
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m >= first_pos) & (offs_m < seq_len)
    q_rows = (offs_m - first_pos).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    full_row = tl.load(full_rows_ptr + head * num_tokens_index + offs_m, mask=row_ok, other=0)
    m_i = tl.full([TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], tl.float32)
    plan_row = head * num_query_tiles + slot
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh

    count = tl.load(tile_count_ptr + plan_row)
    for i in range(0, count):
        key_tile = tl.load(tile_index_ptr + plan_row * max_tiles + i)
        offs_n = key_tile * TILE + tl.arange(0, TILE)
        key_ok = offs_n < seq_len
        physical = tl.load(block_table_ptr + offs_n // KV_BLOCK_SIZE, mask=key_ok, other=0)
        physical = physical.to(tl.int64)
        in_block = offs_n % KV_BLOCK_SIZE
        k = tl.load(k_head + physical[:, None] * stride_kb + in_block[:, None] * stride_kt
                    + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_head + physical[:, None] * stride_vb + in_block[:, None] * stride_vt
                    + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        distance = offs_m[:, None] - offs_n[None, :]
        causal = (distance >= 0) & row_ok[:, None] & key_ok[None, :]
        on_diagonal = tl.load(diagonals_ptr + head * num_tokens_index + distance,
                              mask=causal, other=0)
        column = tl.load(columns_ptr + head * num_tokens_index + offs_n, mask=key_ok, other=0)
        block = tl.load(blocks_ptr + (head * num_tiles + query_tile) * num_tiles + key_tile)
        keep = causal & ((on_diagonal != 0) | (column[None, :] != 0)
                         | (full_row[:, None] != 0) | (block != 0))
        m_i, l_i, acc = _online_update(q, k, v, keep, m_i, l_i, acc, scale)

    columns = tl.load(column_count_ptr + plan_row)
    for first in range(0, columns, TILE):
        offs_c = first + tl.arange(0, TILE)
        column_ok = offs_c < columns
        keys = tl.load(column_index_ptr + plan_row * max_columns + offs_c, mask=column_ok,
                       other=0)
        physical = tl.load(block_table_ptr + keys // KV_BLOCK_SIZE, mask=column_ok, other=0)
        physical = physical.to(tl.int64)
        in_block = keys % KV_BLOCK_SIZE
        k = tl.load(k_head + physical[:, None] * stride_kb + in_block[:, None] * stride_kt
                    + offs_d[None, :], mask=column_ok[:, None], other=0.0)
        v = tl.load(v_head + physical[:, None] * stride_vb + in_block[:, None] * stride_vt
                    + offs_d[None, :], mask=column_ok[:, None], other=0.0)
        keep = column_ok[None, :] & row_ok[:, None] & (keys[None, :] <= offs_m[:, None])
        m_i, l_i, acc = _online_update(q, k, v, keep, m_i, l_i, acc, scale)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def head_sparse_prefill_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    layer_heads,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sparse_prefill``'s contract for a ``LayerHeadPatterns``. The index is estimated in
    torch (the reference's estimators), the plan built in torch, the attention in Triton.
    Needs a power-of-two head dim >= 16 and the layer's block size >= 16 (the tile)."""
    if out is None:
        out = torch.empty_like(query)
    tile = layer_heads.block_size
    head_dim = query.shape[2]
    group = query.shape[1] // key_cache.shape[1]
    starts = query_start_loc.tolist()
    for seq, (seq_len, prompt_len) in enumerate(zip(seq_lens.tolist(), prompt_lens.tolist(),
                                                    strict=True)):
        begin, end = starts[seq], starts[seq + 1]
        if end == begin:
            continue
        first_pos = seq_len - (end - begin)
        # estimation reads this step's rows and every key (float32, as the reference)
        keys = gather_sequence_kv(key_cache, block_table[seq], seq_len).float()
        positions = torch.arange(first_pos, seq_len, device=query.device)
        chunk = SequenceChunk(query[begin:end].float(), positions, keys, int(prompt_len), scale)
        index = layer_heads.build_index(chunk)
        query_tiles = torch.arange(first_pos // tile, (seq_len - 1) // tile + 1,
                                   device=query.device)
        plan = make_plan(index, query_tiles)
        to_device = lambda t: t.to(query.device).contiguous()  # noqa: E731
        rows_q, rows_out = query[begin:end], out[begin:end]
        grid = (query_tiles.numel(), query.shape[1])
        _head_sparse_kernel[grid](
            rows_q, rows_out, key_cache, value_cache, block_table[seq],
            to_device(plan.tile_count), to_device(plan.tile_index),
            to_device(plan.column_count), to_device(plan.column_index),
            to_device(index.columns.to(torch.int8)), to_device(index.diagonals.to(torch.int8)),
            to_device(index.full_rows.to(torch.int8)), to_device(index.blocks.to(torch.int8)),
            first_pos, seq_len, int(query_tiles[0]), query_tiles.numel(),
            index.blocks.shape[1], scale,
            rows_q.stride(0), rows_q.stride(1), rows_out.stride(0), rows_out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            plan.tile_index.shape[2], plan.column_index.shape[2], index.num_tokens,
            GROUP=group, KV_BLOCK_SIZE=key_cache.shape[2], TILE=tile, HEAD_DIM=head_dim,
        )
    return out
