"""Sparse prefill attention over a paged KV cache: Triton GPU kernels (Hopper-tuned).

Same function as ``sparse_prefill_ref`` (per-token pattern, see ``patterns/triangle.py``),
split into the two shapes of work the triangle pattern has:

1. ``_streaming_rows_kernel``: every query row that is not a last-q row attends its sinks
   and its local window. Short KV per program (about window + rows keys), so the program
   packs the GQA group into the tile: its BLOCK_M rows are ``ROWS`` consecutive tokens x the
   ``GROUP`` query heads that share one KV head (``m = row * GROUP_PAD + head``). Each K/V
   tile is loaded once for the whole group, and the key span per program is only
   ``window + ROWS - 1`` keys (ROWS = 32 at GQA 4) instead of ``window + BLOCK_M - 1``:
   fewer wasted tile elements than 128-row per-head tiles. The dense pattern runs through
   this kernel too (window = infinity, no last rows).
2. ``_last_rows_kernel`` (+ ``_combine_splits_kernel``): the last-q rows attend every
   causal key: long KV, few rows. Split-KV (flash-decoding style) gives the GPU enough
   programs; the splits are merged by log-sum-exp. With a single split the kernel writes
   the output directly.

Every output row is written by exactly one of the two paths (a row is a last-q row or not).
The K/V rows are gathered through the block table per key (paged, any block size), so tiles
need not align with cache blocks. Softmax in base 2 with fp32 statistics, P in the input
dtype for the PV product (FlashAttention-2 style).

Importing this module never needs a GPU; without triton installed it imports and
``sparse_prefill_triton`` raises.
"""

import math
from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: keep the module importable, launching raises
    HAS_TRITON = False

    class _TritonStub:
        constexpr = object

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda inner: inner)

    triton = tl = _TritonStub()

# Masking modes of a key tile (compile-time): which part of the pattern must be applied.
MASK_NONE = 0  # every (row, key) in the tile is kept: no mask work at all
MASK_STREAMING = 1  # causal & (sink | window), plus the load bound
MASK_CAUSAL = 2  # causal only (last rows), plus the load bound
MASK_KEY_BOUND = 3  # keys below a bound (the sink tile), all rows

_INFINITE_WINDOW = 1 << 30
_LOG2_E = 1.4426950408889634


@triton.jit
def _attend_key_tiles(
    acc,
    row_sum,
    row_max,
    q,
    query_pos,
    key_cache_head_ptr,
    value_cache_head_ptr,
    block_table_row_ptr,
    key_desc,
    value_desc,
    kv_head,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    first_key,
    num_tiles,
    key_limit,
    qk_scale,
    sink_tokens,
    window_tokens,
    edge_begin,
    edge_end,
    MASK_MODE: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    KV_TMA: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """Online-softmax update of (acc, row_sum, row_max) over ``num_tiles`` key tiles of
    BLOCK_N keys starting at ``first_key`` (a multiple of BLOCK_N). Keys are gathered
    through the block table: per key when cache blocks are smaller than a tile, else one
    lookup per tile, and then (KV_TMA) by the copy engine through tensor descriptors."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    for tile in range(0, num_tiles):
        tile_start = first_key + tile * BLOCK_N
        keys = tile_start + offs_n
        if MASK_MODE == 0:
            load_ok = d_ok[None, :]
        else:
            key_ok = keys < key_limit
            load_ok = key_ok[:, None] & d_ok[None, :]
        if KV_TMA:
            # A tile lies inside one cache block (KV_BLOCK_SIZE % BLOCK_N == 0): one TMA box.
            # Slots past the sequence are loaded too (a box has no row mask): they hold finite
            # values of a zero-initialised or earlier-written cache, and their scores are
            # masked, so P is 0 there.
            tma_block = tl.load(block_table_row_ptr + tile_start // KV_BLOCK_SIZE)
            tma_slot = tile_start % KV_BLOCK_SIZE
            k = key_desc.load([tma_block, kv_head, tma_slot, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
        elif KV_BLOCK_SIZE % BLOCK_N == 0:
            # tiles are BLOCK_N-aligned, so a tile lies inside one cache block: one lookup
            physical_block = tl.load(block_table_row_ptr + tile_start // KV_BLOCK_SIZE).to(tl.int64)
            row_offsets = (tile_start % KV_BLOCK_SIZE + offs_n) * stride_kt
            k_rows = key_cache_head_ptr + physical_block * stride_kb + row_offsets
            v_rows = (
                value_cache_head_ptr
                + physical_block * stride_vb
                + (tile_start % KV_BLOCK_SIZE + offs_n) * stride_vt
            )
        else:
            if MASK_MODE == 0:
                physical_blocks = tl.load(block_table_row_ptr + keys // KV_BLOCK_SIZE)
            else:
                physical_blocks = tl.load(
                    block_table_row_ptr + keys // KV_BLOCK_SIZE, mask=key_ok, other=0
                )
            physical_blocks = physical_blocks.to(tl.int64)
            slot = keys % KV_BLOCK_SIZE
            k_rows = key_cache_head_ptr + physical_blocks * stride_kb + slot * stride_kt
            v_rows = value_cache_head_ptr + physical_blocks * stride_vb + slot * stride_vt
        if not KV_TMA:
            k = tl.load(k_rows[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k))  # raw q.k; the scale is fused into exp2's argument
        if MASK_MODE == 1:
            distance = query_pos[:, None] - keys[None, :]
            keep = (distance >= 0) & ((keys[None, :] < sink_tokens) | (distance < window_tokens))
            scores = tl.where(keep, scores, float("-inf"))
        elif MASK_MODE == 2:
            keep = query_pos[:, None] >= keys[None, :]
            scores = tl.where(keep, scores, float("-inf"))
        elif MASK_MODE == 3:
            scores = tl.where((keys < key_limit)[None, :], scores, float("-inf"))
        elif MASK_MODE == 4:  # one loop: streaming mask only outside [edge_begin, edge_end)
            if (tile < edge_begin) | (tile >= edge_end):
                distance = query_pos[:, None] - keys[None, :]
                keep = (distance >= 0) & (
                    (keys[None, :] < sink_tokens) | (distance < window_tokens)
                )
                scores = tl.where(keep, scores, float("-inf"))
        elif MASK_MODE == 5:  # one loop: causal mask only from tile edge_begin on
            if tile >= edge_begin:
                keep = query_pos[:, None] >= keys[None, :]
                scores = tl.where(keep, scores, float("-inf"))
        tile_max = tl.max(scores, 1) * qk_scale
        if LAZY_RESCALE:
            # Keep the running max stale unless some row's max grew by more than 2^8:
            # numerator and denominator share the stale max, so the result is exact, the
            # probabilities stay <= 256 (safe in fp32 and bf16), and the O(BLOCK_M x D)
            # rescale of acc is skipped on most tiles (FlashAttention-4's trick).
            if tl.max(tile_max - row_max) > 8.0:
                new_max = tl.maximum(row_max, tile_max)
                rescale = tl.math.exp2(row_max - new_max)
                acc = acc * rescale[:, None]
                row_sum = row_sum * rescale
                row_max = new_max
            probs = tl.math.exp2(scores * qk_scale - row_max[:, None])
            row_sum = row_sum + tl.sum(probs, 1)
            if KV_TMA:
                v = value_desc.load([tma_block, kv_head, tma_slot, 0]).reshape(
                    BLOCK_N, HEAD_DIM_PAD
                )
            else:
                v = tl.load(v_rows[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
            acc = acc + tl.dot(probs.to(v.dtype), v)
        else:
            new_max = tl.maximum(row_max, tile_max)
            rescale = tl.math.exp2(row_max - new_max)
            probs = tl.math.exp2(scores * qk_scale - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            if KV_TMA:
                v = value_desc.load([tma_block, kv_head, tma_slot, 0]).reshape(
                    BLOCK_N, HEAD_DIM_PAD
                )
            else:
                v = tl.load(v_rows[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
            row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _find_sequence(query_start_loc_ptr, tile_id, num_seqs, ROWS: tl.constexpr):
    """Largest s with ``query_start_loc[s] // ROWS + s <= tile_id`` (binary search).

    Sequence s owns tiles ``[qsl[s] // ROWS + s, ...)``: a monotone, gapped numbering that
    needs no prefix sum, so the grid is ``T // ROWS + num_seqs`` without a host sync."""
    low = 0
    high = num_seqs - 1
    while low < high:
        mid = (low + high + 1) // 2
        mid_first_tile = tl.load(query_start_loc_ptr + mid) // ROWS + mid
        if mid_first_tile <= tile_id:
            low = mid
        else:
            high = mid - 1
    return low


@triton.jit(do_not_specialize=["num_seqs", "sink_tokens", "window_tokens", "last_q_tokens"])
def _streaming_rows_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    key_desc,
    value_desc,
    out_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    prompt_lens_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_bt,
    num_seqs,
    qk_scale,
    sink_tokens,
    window_tokens,
    last_q_tokens,
    HAS_LAST_ROWS: tl.constexpr,
    SINGLE_LOOP: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    KV_TMA: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINK_BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = ROWS * GROUP_PAD
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, tile_id, num_seqs, ROWS)
    query_begin = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_begin
    row_begin = (tile_id - (query_begin // ROWS + seq)) * ROWS
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - query_len
    tile_first_pos = first_pos + row_begin
    rows_end_pos = seq_len
    if HAS_LAST_ROWS:
        prompt_len = tl.maximum(tl.load(prompt_lens_ptr + seq), seq_len)
        rows_end_pos = tl.minimum(seq_len, tl.maximum(prompt_len - last_q_tokens, 0))
    tile_end_pos = tl.minimum(tile_first_pos + ROWS, rows_end_pos)
    if (row_begin >= query_len) | (tile_end_pos <= tile_first_pos):
        return
    max_row_pos = tile_end_pos - 1

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_in_tile = offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    query_pos = tile_first_pos + row_in_tile
    row_ok = (query_pos <= max_row_pos) & (head_in_group < GROUP)
    token = (query_begin + row_begin + row_in_tile).to(tl.int64)
    q_head = kv_head * GROUP + head_in_group
    io_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        query_ptr + token[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
        mask=io_ok,
        other=0.0,
    )

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    key_cache_head_ptr = key_cache_ptr + kv_head * stride_kh
    value_cache_head_ptr = value_cache_ptr + kv_head * stride_vh
    block_table_row_ptr = block_table_ptr + seq * stride_bt

    # Window tiles cover keys [window_start, max_row_pos]; sinks before window_start go
    # in their own small tiles (no row's window reaches them, so nothing is counted twice).
    # (window start rounded down to a tile boundary: tiles then never straddle a cache
    # block when the block size is a multiple of BLOCK_N; the mask drops the extra keys)
    window_start = tl.maximum(tile_first_pos - window_tokens + 1, 0) // BLOCK_N * BLOCK_N
    sink_end = tl.minimum(sink_tokens, window_start)
    if sink_end > 0:
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            0, tl.cdiv(sink_end, SINK_BLOCK_N), sink_end,
            qk_scale, sink_tokens, window_tokens, 0, 0,
            3, LAZY_RESCALE, False,
            KV_BLOCK_SIZE, SINK_BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip
    key_limit = max_row_pos + 1
    num_tiles = tl.cdiv(key_limit - window_start, BLOCK_N)
    # leading tiles cut by the last row's window edge; trailing tiles cut by the diagonal
    window_edge = tl.maximum(max_row_pos - window_tokens + 1 - window_start, 0)
    full_begin = tl.minimum(tl.cdiv(window_edge, BLOCK_N), num_tiles)
    full_end = tl.minimum(
        tl.maximum((tile_first_pos + 1 - window_start) // BLOCK_N, full_begin), num_tiles
    )
    if SINGLE_LOOP:
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            window_start, num_tiles, key_limit,
            qk_scale, sink_tokens, window_tokens, full_begin, full_end,
            4, LAZY_RESCALE, KV_TMA,
            KV_BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip
    else:
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            window_start, full_begin, key_limit,
            qk_scale, sink_tokens, window_tokens, 0, 0,
            1, LAZY_RESCALE, KV_TMA,
            KV_BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            window_start + full_begin * BLOCK_N, full_end - full_begin, key_limit,
            qk_scale, sink_tokens, window_tokens, 0, 0,
            0, LAZY_RESCALE, KV_TMA,
            KV_BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            window_start + full_end * BLOCK_N, num_tiles - full_end, key_limit,
            qk_scale, sink_tokens, window_tokens, 0, 0,
            1, LAZY_RESCALE, KV_TMA,
            KV_BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip

    row_sum = tl.where(row_ok, row_sum, 1.0)
    attended = acc / row_sum[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
        attended.to(out_ptr.dtype.element_ty),
        mask=io_ok,
    )


@triton.jit
def _last_rows_extent(
    query_start_loc_ptr, seq_lens_ptr, prompt_lens_ptr, seq, row_tile, last_q_tokens,
    ROWS: tl.constexpr,
):  # fmt: skip
    """(first query index of the seq, first row position of this tile, end position)."""
    query_begin = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    prompt_len = tl.maximum(tl.load(prompt_lens_ptr + seq), seq_len)
    first_pos = seq_len - query_len
    last_rows_first_pos = tl.maximum(tl.maximum(prompt_len - last_q_tokens, 0), first_pos)
    tile_first_pos = last_rows_first_pos + row_tile * ROWS
    tile_end_pos = tl.minimum(tile_first_pos + ROWS, seq_len)
    return query_begin, first_pos, tile_first_pos, tile_end_pos


@triton.jit(
    do_not_specialize=["num_kv_heads", "num_row_tiles", "num_splits", "split_keys", "last_q_tokens"]
)
def _last_rows_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    key_desc,
    value_desc,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    prompt_lens_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_bt,
    num_kv_heads,
    num_row_tiles,
    num_splits,
    split_keys,
    qk_scale,
    last_q_tokens,
    DIRECT: tl.constexpr,
    SINGLE_LOOP: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    KV_TMA: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = ROWS * GROUP_PAD
    row_tile = tl.program_id(0)
    split = tl.program_id(1)
    seq_head = tl.program_id(2)
    seq = seq_head // num_kv_heads
    kv_head = seq_head % num_kv_heads
    query_begin, first_pos, tile_first_pos, tile_end_pos = _last_rows_extent(
        query_start_loc_ptr, seq_lens_ptr, prompt_lens_ptr, seq, row_tile, last_q_tokens, ROWS
    )
    if tile_end_pos <= tile_first_pos:
        return
    max_row_pos = tile_end_pos - 1

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_in_tile = offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    query_pos = tile_first_pos + row_in_tile
    row_ok = (query_pos <= max_row_pos) & (head_in_group < GROUP)
    token = (query_begin + (query_pos - first_pos)).to(tl.int64)
    q_head = kv_head * GROUP + head_in_group
    io_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        query_ptr + token[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
        mask=io_ok,
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)

    key_begin = split * split_keys
    key_limit = max_row_pos + 1
    key_end = tl.minimum(key_begin + split_keys, key_limit)
    num_tiles = tl.cdiv(tl.maximum(key_end - key_begin, 0), BLOCK_N)
    # tiles entirely at or below the tile's first row need no mask
    full_tiles = tl.minimum(tl.maximum(tile_first_pos + 1 - key_begin, 0) // BLOCK_N, num_tiles)
    key_cache_head_ptr = key_cache_ptr + kv_head * stride_kh
    value_cache_head_ptr = value_cache_ptr + kv_head * stride_vh
    block_table_row_ptr = block_table_ptr + seq * stride_bt
    if SINGLE_LOOP:
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            key_begin, num_tiles, key_limit,
            qk_scale, 0, 0, full_tiles, num_tiles,
            5, LAZY_RESCALE, KV_TMA,
            KV_BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip
    else:
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            key_begin, full_tiles, key_limit,
            qk_scale, 0, 0, 0, 0,
            0, LAZY_RESCALE, KV_TMA,
            KV_BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip
        acc, row_sum, row_max = _attend_key_tiles(
            acc, row_sum, row_max, q, query_pos,
            key_cache_head_ptr, value_cache_head_ptr, block_table_row_ptr,
            key_desc, value_desc, kv_head,
            stride_kb, stride_kt, stride_vb, stride_vt,
            key_begin + full_tiles * BLOCK_N, num_tiles - full_tiles, key_limit,
            qk_scale, 0, 0, 0, 0,
            2, LAZY_RESCALE, KV_TMA,
            KV_BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD,
        )  # fmt: skip

    if DIRECT:
        attended = acc / tl.where(row_ok, row_sum, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
            attended.to(out_ptr.dtype.element_ty),
            mask=io_ok,
        )
    else:
        has_keys = row_sum > 0.0
        partial = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
        lse = tl.where(
            has_keys, row_max + tl.math.log2(tl.where(has_keys, row_sum, 1.0)), float("-inf")
        )
        slot = ((seq_head * num_row_tiles + row_tile) * num_splits + split).to(tl.int64)
        tl.store(partial_lse_ptr + slot * BLOCK_M + offs_m, lse)
        tl.store(
            partial_out_ptr + (slot * BLOCK_M + offs_m[:, None]) * HEAD_DIM_PAD + offs_d[None, :],
            partial,
        )


@triton.jit(do_not_specialize=["num_kv_heads", "num_row_tiles", "num_splits", "last_q_tokens"])
def _combine_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    prompt_lens_ptr,
    stride_ot,
    stride_oh,
    num_kv_heads,
    num_row_tiles,
    num_splits,
    last_q_tokens,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    CHUNK_M: tl.constexpr,
):
    BLOCK_M: tl.constexpr = ROWS * GROUP_PAD
    # one program merges CHUNK_M of the tile's BLOCK_M rows (more programs, short loops)
    row_tile = tl.program_id(0) // (BLOCK_M // CHUNK_M)
    row_chunk = tl.program_id(0) % (BLOCK_M // CHUNK_M)
    seq_head = tl.program_id(1)
    seq = seq_head // num_kv_heads
    kv_head = seq_head % num_kv_heads
    query_begin, first_pos, tile_first_pos, tile_end_pos = _last_rows_extent(
        query_start_loc_ptr, seq_lens_ptr, prompt_lens_ptr, seq, row_tile, last_q_tokens, ROWS
    )
    if tile_end_pos <= tile_first_pos:
        return
    offs_m = row_chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_in_tile = offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    query_pos = tile_first_pos + row_in_tile
    row_ok = (query_pos < tile_end_pos) & (head_in_group < GROUP)
    token = (query_begin + (query_pos - first_pos)).to(tl.int64)
    q_head = kv_head * GROUP + head_in_group

    acc = tl.zeros([CHUNK_M, HEAD_DIM_PAD], dtype=tl.float32)
    weight_sum = tl.zeros([CHUNK_M], dtype=tl.float32)
    running_max = tl.full([CHUNK_M], -1.0e30, dtype=tl.float32)
    first_slot = (seq_head * num_row_tiles + row_tile) * num_splits
    for split in range(0, num_splits):
        slot = (first_slot + split).to(tl.int64)
        lse = tl.load(partial_lse_ptr + slot * BLOCK_M + offs_m)
        partial = tl.load(
            partial_out_ptr + (slot * BLOCK_M + offs_m[:, None]) * HEAD_DIM_PAD + offs_d[None, :]
        )
        new_max = tl.maximum(running_max, lse)
        rescale = tl.math.exp2(running_max - new_max)
        weight = tl.math.exp2(lse - new_max)
        acc = acc * rescale[:, None] + weight[:, None] * partial
        weight_sum = weight_sum * rescale + weight
        running_max = new_max
    attended = acc / tl.where(row_ok, weight_sum, 1.0)[:, None]
    io_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(
        out_ptr + token[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
        attended.to(out_ptr.dtype.element_ty),
        mask=io_ok,
    )


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shapes and launch parameters of the two kernels.

    block_m: rows of the streaming tile (query tokens x padded GQA group); block_n: keys
    per tile. last_*: the same for the last-rows kernel. target_programs: how many
    last-rows programs to aim for when choosing the number of KV splits; min_split_keys:
    never split below this many keys per split. single_loop: one pipelined loop over all
    key tiles with the mask applied only on edge tiles (a runtime branch), instead of
    separate masked / unmasked loops (each loop refills the software pipeline).
    lazy_rescale: rescale the accumulator only when a row max grows by more than 2^8.
    kv_tma: load K/V tiles with the copy engine (TMA tensor descriptors) where a tile lies
    inside one cache block (cache block a multiple of the tile, power-of-two head dim,
    Hopper or newer); else the per-key gather. overlap_last_rows: run the last-rows
    kernels on a side stream, concurrently with the streaming-rows kernel.
    streaming_kernel: "triton", or "gluon" for the Hopper kernel in
    ``sparse_prefill_gluon.py`` where it supports the inputs (block_m, block_n, num_warps
    and num_stages then describe that kernel; the Triton kernel is the fallback).
    programs_per_sm: how many programs of the persistent Gluon kernel run per SM (its
    occupancy: 2 for 64-row tiles with 2 stages).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    last_block_m: int = 128
    last_block_n: int = 64
    last_num_warps: int = 4
    last_num_stages: int = 3
    target_programs: int = 256
    min_split_keys: int = 1024
    single_loop: bool = True
    last_single_loop: bool = False
    lazy_rescale: bool = False
    last_lazy_rescale: bool = False
    kv_tma: bool = True
    overlap_last_rows: bool = True
    streaming_kernel: str = "triton"
    programs_per_sm: int = 2


# Measured on the H200 (benchmarks/trianglemix_NOTES.md): with TMA boxes the persistent
# Gluon kernel on 64-row tiles (one warpgroup, two programs per SM) runs the streaming
# rows fastest; of the Triton configs, one warpgroup on 128-row tiles; with the per-key
# gather (cache blocks smaller than a key tile, vLLM's default 16) the loads go through
# registers and 16 warps on 256-row tiles hide their latency best.
TMA_CONFIG = LaunchConfig()
GLUON_CONFIG = LaunchConfig(streaming_kernel="gluon", block_m=64, num_stages=2)
GATHER_CONFIG = LaunchConfig(block_m=256, num_warps=16, num_stages=2, kv_tma=False)


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _kv_descriptors(key_cache: torch.Tensor, value_cache: torch.Tensor, block_n: int):
    """TMA descriptors over the 4-D caches (one box = one key tile of one KV head), or None
    when a tile cannot be one box (cache block not a multiple of the tile, head dim not a
    power of two, unaligned strides, pre-Hopper GPU, CPU tensors)."""
    num_blocks, num_kv_heads, kv_block_size, head_dim = key_cache.shape
    usable = (
        key_cache.is_cuda
        and torch.cuda.get_device_capability(key_cache.device)[0] >= 9
        and kv_block_size % block_n == 0
        and head_dim == _next_power_of_2(head_dim)
        and all(
            cache.data_ptr() % 16 == 0
            and all(stride * cache.element_size() % 16 == 0 for stride in cache.stride()[:-1])
            for cache in (key_cache, value_cache)
        )
    )
    if not usable:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    box = [1, 1, block_n, head_dim]
    return tuple(
        TensorDescriptor(cache, list(cache.shape), list(cache.stride()), box)
        for cache in (key_cache, value_cache)
    )


def _last_rows_plan(
    config: LaunchConfig, last_q_tokens: int, num_tokens: int, group_pad: int,
    num_seq_heads: int, max_kv_len: int,
) -> tuple[int, int, int, int, int]:  # fmt: skip
    """(rows per tile, tile height, row tiles, KV splits, keys per split) of the last-rows
    kernel: enough splits for about ``target_programs`` programs, none under
    ``min_split_keys`` keys, each split a whole number of key tiles."""
    last_rows = max(config.last_block_m // group_pad, 1)
    num_row_tiles = math.ceil(min(last_q_tokens, num_tokens) / last_rows)
    base_programs = num_row_tiles * num_seq_heads
    num_splits = max(
        1,
        min(math.ceil(max_kv_len / config.min_split_keys), config.target_programs // base_programs),
    )
    split_keys = config.last_block_n * math.ceil(
        math.ceil(max_kv_len / num_splits) / config.last_block_n
    )
    num_splits = math.ceil(max_kv_len / split_keys)
    return last_rows, last_rows * group_pad, num_row_tiles, num_splits, split_keys


_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One high-priority side stream per device, for the last-rows kernels."""
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index, priority=-1)
    return _SIDE_STREAMS[index]


def default_config(key_cache: torch.Tensor, value_cache: torch.Tensor) -> LaunchConfig:
    """The measured-best launch config for these caches: TMA when every key tile of both
    kernels is one copy-engine box (the Gluon streaming kernel on Hopper), else the gather
    config."""
    tma_usable = all(
        _kv_descriptors(key_cache, value_cache, block_n) is not None
        for block_n in {TMA_CONFIG.block_n, TMA_CONFIG.last_block_n}
    )
    if not tma_usable:
        return GATHER_CONFIG
    hopper = torch.cuda.get_device_capability(key_cache.device)[0] == 9
    return GLUON_CONFIG if hopper else TMA_CONFIG


def with_overrides(base: LaunchConfig, overlap_last_rows: bool, streaming: str) -> LaunchConfig:
    """``base`` with the serving settings' overrides: the last-rows side-stream overlap on or
    off, and ``streaming="triton"`` trading the Gluon streaming kernel for the Triton one
    with its own measured-best tiles (TMA_CONFIG), never Gluon's tiles on Triton."""
    if streaming == "triton" and base.streaming_kernel == "gluon":
        base = TMA_CONFIG
    return replace(base, overlap_last_rows=overlap_last_rows)


def sparse_prefill_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    pattern,
    scale: float,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Triton version of ``sparse_prefill_ref`` (same arguments, same function).

    query ``[T, Hq, D]`` bf16/fp16 (fp32 works, with tf32 dot products), caches
    ``[num_blocks, Hkv, block_size, D]`` with unit stride on D (other strides free),
    int32 metadata. No host synchronisation: grid sizes come from tensor shapes only.
    """
    if not HAS_TRITON:
        raise RuntimeError("sparse_prefill_triton needs triton; use sparse_prefill_ref on CPU")
    config = config or default_config(key_cache, value_cache)
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, kv_block_size = key_cache.shape[1], key_cache.shape[2]
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    for name, tensor in (
        ("query", query),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
        ("out", out),
    ):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on the head dimension")
    group = num_q_heads // num_kv_heads
    group_pad = _next_power_of_2(group)
    head_dim_pad = max(_next_power_of_2(head_dim), 16)
    num_seqs = seq_lens.shape[0]
    qk_scale = scale * _LOG2_E

    if pattern.is_dense:
        sink_tokens, window_tokens, last_q_tokens = 0, _INFINITE_WINDOW, 0
    else:
        sink_tokens = pattern.sink_tokens
        window_tokens = min(pattern.window_tokens, _INFINITE_WINDOW)
        last_q_tokens = pattern.last_q_tokens

    rows = max(config.block_m // group_pad, 1)
    sink_block_n = min(config.block_n, max(16, _next_power_of_2(max(sink_tokens, 1))))
    kv_strides = (
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
    )  # fmt: skip
    descriptors = _kv_descriptors(key_cache, value_cache, config.block_n) if config.kv_tma else None

    def launch_streaming_rows() -> None:
        if config.streaming_kernel == "gluon":
            try:
                from attention_backends.kernels import sparse_prefill_gluon as gluon_kernels
            except ImportError:  # a triton without Gluon: the Triton kernel below
                gluon_kernels = None
            if gluon_kernels is not None and gluon_kernels.gluon_streaming_supported(
                query, key_cache, config.block_n, sink_tokens, group, config.block_m
            ):
                gluon_kernels.launch_streaming_rows_gluon(
                    query, key_cache, value_cache, out, block_table, query_start_loc, seq_lens,
                    prompt_lens, qk_scale, sink_tokens, window_tokens, last_q_tokens, group,
                    config.block_m, config.block_n, config.num_stages, config.num_warps,
                    config.programs_per_sm,
                )  # fmt: skip
                return
        _streaming_rows_kernel[(num_tokens // rows + num_seqs, num_kv_heads)](
            query, key_cache, value_cache, *(descriptors or (key_cache, value_cache)), out,
            block_table, query_start_loc, seq_lens, prompt_lens,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            *kv_strides, block_table.stride(0),
            num_seqs, qk_scale, sink_tokens, window_tokens, last_q_tokens,
            HAS_LAST_ROWS=last_q_tokens > 0, SINGLE_LOOP=config.single_loop,
            LAZY_RESCALE=config.lazy_rescale, KV_TMA=descriptors is not None,
            GROUP=group, GROUP_PAD=group_pad, ROWS=rows,
            BLOCK_N=config.block_n, SINK_BLOCK_N=sink_block_n,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, KV_BLOCK_SIZE=kv_block_size,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    def launch_last_rows() -> None:
        last_rows, block_m, num_row_tiles, num_splits, split_keys = _last_rows_plan(
            config, last_q_tokens, num_tokens, group_pad, num_seqs * num_kv_heads,
            block_table.shape[1] * kv_block_size,
        )  # fmt: skip
        direct = num_splits == 1
        if direct:
            partial_out = partial_lse = out  # unused
        else:
            num_slots = num_row_tiles * num_seqs * num_kv_heads * num_splits
            partial_out = torch.empty(
                num_slots * block_m * head_dim_pad, dtype=torch.float32, device=query.device
            )
            partial_lse = torch.empty(num_slots * block_m, dtype=torch.float32, device=query.device)
        if config.kv_tma and config.last_block_n != config.block_n:
            last_descriptors = _kv_descriptors(key_cache, value_cache, config.last_block_n)
        else:
            last_descriptors = descriptors
        _last_rows_kernel[(num_row_tiles, num_splits, num_seqs * num_kv_heads)](
            query, key_cache, value_cache, *(last_descriptors or (key_cache, value_cache)),
            out, partial_out, partial_lse,
            block_table, query_start_loc, seq_lens, prompt_lens,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            *kv_strides, block_table.stride(0),
            num_kv_heads, num_row_tiles, num_splits, split_keys, qk_scale, last_q_tokens,
            DIRECT=direct, SINGLE_LOOP=config.last_single_loop,
            LAZY_RESCALE=config.last_lazy_rescale, KV_TMA=last_descriptors is not None,
            GROUP=group, GROUP_PAD=group_pad, ROWS=last_rows,
            BLOCK_N=config.last_block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            KV_BLOCK_SIZE=kv_block_size,
            num_warps=config.last_num_warps, num_stages=config.last_num_stages,
        )  # fmt: skip
        if not direct:
            chunk_m = min(32, block_m)
            _combine_splits_kernel[(num_row_tiles * (block_m // chunk_m), num_seqs * num_kv_heads)](
                out, partial_out, partial_lse, query_start_loc, seq_lens, prompt_lens,
                out.stride(0), out.stride(1),
                num_kv_heads, num_row_tiles, num_splits, last_q_tokens,
                GROUP=group, GROUP_PAD=group_pad, ROWS=last_rows,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CHUNK_M=chunk_m,
                num_warps=4,
            )  # fmt: skip

    if last_q_tokens == 0:
        launch_streaming_rows()
    elif config.overlap_last_rows and query.is_cuda:
        # The few long last-row programs go on a high-priority side stream, enqueued first,
        # so the GPU dispatches them first and fills the SMs around them with the many
        # short streaming programs: no tail of either kernel, no serial gap between them.
        main_stream = torch.cuda.current_stream(query.device)
        side_stream = _side_stream(query.device)
        side_stream.wait_stream(main_stream)
        with torch.cuda.stream(side_stream):
            launch_last_rows()
        launch_streaming_rows()
        main_stream.wait_stream(side_stream)  # every input and `out` outlive the side work
    else:
        launch_streaming_rows()
        launch_last_rows()
    return out
