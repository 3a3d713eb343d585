"""Per-head sparse prefill in Triton: the GPU path for ``patterns/minference``.

A program owns one (query tile, query head) of one sequence and walks the ``KernelPlan``:
first the listed key tiles (loaded whole, masked per token with the index's four sets, so the
result is exactly ``HeadsIndex.keep_mask``), then the gathered columns in groups of ``TILE``
keys, with one online softmax over both. The per-token mask reads the diagonal and column
flags as bits (``_tile_keep``): one 64-bit window per row and tile, not a byte per pair.
K/V of a listed tile are read through one block-table entry when the cache block holds
whole tiles, else per key (the gather layout of ``sparse_prefill_triton``'s 16-token-block
path), so any cache block size works.

Launch order (Hopper lessons, ``benchmarks/trianglemix_NOTES.md``): the head is the fastest
grid axis, so the ``GROUP`` query heads that read one KV head, and neighbouring query tiles
whose bands overlap, run at the same time and share K/V tiles in L2 (per KV head, K+V are
64 MiB at 128K: more than the 50 MiB L2, so a head-major order would re-read them from
HBM). Query tiles run last-first: causal and full-row tiles make late tiles the longest,
and starting them first shortens the tail. One warpgroup (4 warps) per 64-row tile, the
shape of one wgmma; the softmax runs in exp2 with the scale folded in.

Three steps per sequence, public so that the benchmark can time each: ``estimate_index``
(the patterns' estimators: vertical-slash in Triton on CUDA, the rest torch),
``prepare_plan`` (the tile/column plan: the Triton plan kernels on CUDA, ``make_plan``
elsewhere), and ``launch_plan`` (the kernel). Not yet done: GQA-packed 128-row programs
sharing K/V tiles (minference_NOTES.md, session 3: 64-row packing measured as moving the work
by -10..+8% without changing bytes per FLOP), TMA tile loads for 64-token cache blocks,
softmax/MMA overlap (the Gluon kernel's structure), a varlen launch instead of one launch
per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from attention_backends.kernels.head_sparse_plan import compact, make_plan, pack_bits
from attention_backends.kernels.head_sparse_plan_triton import make_plan_device
from attention_backends.kernels.head_sparse_ref import sequences_with_rows
from attention_backends.kernels.sparse_prefill_ref import gather_sequence_kv
from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk


@dataclass(frozen=True)
class HeadSparseLaunch:
    """Launch parameters. 4 warps = one warpgroup, the wgmma shape of a 64-row tile.

    ``separate_full_rows``: compute the full rows (MMInference's horizontal grid lines,
    TriangleMix's last rows, dense heads) in a second pass over just those rows, packed
    ``TILE`` at a time in position order, i.e. on the permuted layout where each line is one
    contiguous run. In token order a grid line puts one full row in every query tile at
    strides <= the tile, and that row alone makes the whole tile visit every key tile."""

    num_warps: int = 4
    num_stages: int = 2
    separate_full_rows: bool = False
    # session 2's per-pair byte-gather mask instead of the bit windows: kept only so that
    # the benchmark can time both in one run (minference_NOTES.md, session 3)
    byte_mask: bool = False
    # the plan from the Triton plan kernels (head_sparse_plan_triton) or from torch
    # (make_plan); None: Triton on CUDA, torch elsewhere
    device_plan: bool | None = None


DEFAULT_LAUNCH = HeadSparseLaunch()


@triton.jit
def _online_update(q, k, v, keep, m_i, l_i, acc, scale_log2, PRECISION: tl.constexpr):
    # the running max is kept in raw score units and the scale (with log2(e), so exp2
    # replaces exp) applied inside the exponent: one FFMA per pair instead of a multiply
    # and a subtract (FlashAttention's form; the scale is positive, so maxima commute)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    scores = tl.where(keep, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    probs = tl.math.exp2(scores * scale_log2 - (m_safe * scale_log2)[:, None])
    alpha = tl.math.exp2((m_i - m_safe) * scale_log2)
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _bit_window(words_ptr, start, num_words):
    """Bits ``start .. start + 63`` of a packed flag array (``head_sparse_plan.pack_bits``)
    as uint64, bit ``j`` = flag ``start + j``; flags before 0 or past the words read as 0.
    ``start`` is a scalar or a vector (one window per element)."""
    word = start >> 5  # arithmetic: start in -63..-1 gives words -2/-1, masked to 0
    offset = (start & 31).to(tl.uint64)
    w0 = tl.load(words_ptr + word, mask=(word >= 0) & (word < num_words), other=0)
    w1 = tl.load(words_ptr + word + 1, mask=(word >= -1) & (word + 1 < num_words), other=0)
    w2 = tl.load(words_ptr + word + 2, mask=(word >= -2) & (word + 2 < num_words), other=0)
    low = (w0.to(tl.uint64) | (w1.to(tl.uint64) << 32)) >> offset
    # w2 << (64 - offset) in two steps: a shift by 64 is undefined, and offset may be 0
    return low | ((w2.to(tl.uint64) << (63 - offset)) << 1)


@triton.jit
def _tile_keep(diag_words, col_words, rows, row_all, row_ok, key_start, seq_len,
               num_words, TILE: tl.constexpr):
    """Keep mask ``[R, TILE]`` of rows (absolute positions ``rows``) against keys
    ``key_start .. key_start + TILE - 1``: exactly ``HeadsIndex.keep_mask``.

    Bit ``j`` of a row's 64-bit word stands for key ``key_start + TILE - 1 - j`` (distance
    ``row - key_start - TILE + 1 + j``), so the row's kept diagonals over the whole tile are
    one window of the packed diagonal bits, the tile's kept columns one window of the
    reversed column bits (shared by every row), and causality and the sequence end clear
    the low bits. Per pair only a shift, an and and a compare remain; the byte gather per
    pair this replaces was ~70% of the loop's instructions (minference_NOTES.md)."""
    first = rows - key_start - (TILE - 1)  # distance of bit 0, per row (>= -63)
    bits = _bit_window(diag_words, first, num_words)
    bits = bits | _bit_window(col_words, num_words * 32 - key_start - TILE, num_words)
    every = ~tl.zeros_like(bits)
    bits = tl.where(row_all, every, bits)
    # causal: bit j is key <= row iff j >= -first
    bits = bits & (every << tl.maximum(-first, 0).to(tl.uint64))
    # keys past the sequence end: bit j is a key < seq_len iff j > key_start + TILE - 1 - seq_len
    past = tl.maximum(key_start + TILE - seq_len, 0).to(tl.uint64)
    bits = tl.where(row_ok, bits & (every << past), 0)
    shift = (TILE - 1 - tl.arange(0, TILE)).to(tl.uint64)
    return ((bits[:, None] >> shift[None, :]) & 1) != 0


@triton.jit
def _load_kv_tile(k_head, v_head, block_table_ptr, key_start, seq_len,
                  stride_kb, stride_kt, stride_vb, stride_vt,
                  KV_BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V ``[TILE, HEAD_DIM]`` of keys ``key_start ..``, 0 past ``seq_len``. A tile
    inside one cache block (the block a multiple of the tile) takes one block-table entry
    for the tile; otherwise one per key."""
    offs_n = key_start + tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < seq_len
    if KV_BLOCK_SIZE % TILE == 0:
        physical = tl.load(block_table_ptr + key_start // KV_BLOCK_SIZE).to(tl.int64)
        in_block = key_start % KV_BLOCK_SIZE + tl.arange(0, TILE)
        k_rows = physical * stride_kb + in_block * stride_kt
        v_rows = physical * stride_vb + in_block * stride_vt
    else:
        physical = tl.load(block_table_ptr + offs_n // KV_BLOCK_SIZE, mask=key_ok, other=0)
        physical = physical.to(tl.int64)
        in_block = offs_n % KV_BLOCK_SIZE
        k_rows = physical * stride_kb + in_block * stride_kt
        v_rows = physical * stride_vb + in_block * stride_vt
    k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _head_sparse_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr,
    tile_count_ptr, tile_index_ptr, column_count_ptr, column_index_ptr,
    col_words_ptr, diag_words_ptr, full_rows_ptr, blocks_ptr, columns_ptr, diagonals_ptr,
    first_pos, seq_len, first_query_tile, num_query_tiles, num_tiles, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    max_tiles, max_columns, num_tokens_index, num_words,
    GROUP: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BYTE_MASK: tl.constexpr,
):
    head = tl.program_id(0)
    slot = num_query_tiles - 1 - tl.program_id(1)  # query tile, last first
    kv_head = head // GROUP
    query_tile = first_query_tile + slot
    offs_m = query_tile * TILE + tl.arange(0, TILE)  # absolute positions
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m >= first_pos) & (offs_m < seq_len)
    q_rows = (offs_m - first_pos).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # int64 bases: at 1M tokens x 32 heads the plan and block-flag offsets pass 2^31
    head64 = head.to(tl.int64)
    flags_base = head64 * num_tokens_index
    full_row = tl.load(full_rows_ptr + flags_base + offs_m, mask=row_ok, other=0)
    m_i = tl.full([TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], tl.float32)
    plan_row = head64 * num_query_tiles + slot
    block_row = (head64 * num_tiles + query_tile) * num_tiles
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh

    count = tl.load(tile_count_ptr + plan_row)
    diag_words = diag_words_ptr + head64 * num_words
    col_words = col_words_ptr + head64 * num_words
    for i in range(0, count):
        key_tile = tl.load(tile_index_ptr + plan_row * max_tiles + i)
        key_start = key_tile * TILE
        k, v = _load_kv_tile(k_head, v_head, block_table_ptr, key_start, seq_len,
                             stride_kb, stride_kt, stride_vb, stride_vt,
                             KV_BLOCK_SIZE, TILE, HEAD_DIM)
        row_all = (full_row != 0) | (tl.load(blocks_ptr + block_row + key_tile) != 0)
        if BYTE_MASK:  # session 2's mask, one byte gather per pair: for same-run A/B only
            offs_n = key_start + tl.arange(0, TILE)
            distance = offs_m[:, None] - offs_n[None, :]
            causal = (distance >= 0) & row_ok[:, None] & (offs_n < seq_len)[None, :]
            on_diagonal = tl.load(diagonals_ptr + flags_base + distance, mask=causal, other=0)
            column = tl.load(columns_ptr + flags_base + offs_n, mask=offs_n < seq_len, other=0)
            keep = causal & ((on_diagonal != 0) | (column[None, :] != 0) | row_all[:, None])
        else:
            keep = _tile_keep(diag_words, col_words, offs_m, row_all, row_ok, key_start,
                              seq_len, num_words, TILE)
        m_i, l_i, acc = _online_update(q, k, v, keep, m_i, l_i, acc, scale_log2, PRECISION)

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
        m_i, l_i, acc = _online_update(q, k, v, keep, m_i, l_i, acc, scale_log2, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _full_rows_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, row_count_ptr,
    row_positions_ptr, first_pos, seq_len, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, max_rows,
    GROUP: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """``TILE`` full rows of one head (ascending absolute positions, any spacing) against
    every causal key: the rows pass of ``separate_full_rows``."""
    head = tl.program_id(0)
    pack = tl.program_id(1)
    kv_head = head // GROUP
    head64 = head.to(tl.int64)
    offs_r = pack * TILE + tl.arange(0, TILE)
    row_ok = offs_r < tl.load(row_count_ptr + head)
    positions = tl.load(row_positions_ptr + head64 * max_rows + offs_r, mask=row_ok, other=0)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (positions - first_pos).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    last = tl.max(tl.where(row_ok, positions, -1), axis=0)
    num_key_tiles = tl.where(last >= 0, last // TILE + 1, 0)  # a pack with no row: none
    m_i = tl.full([TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], tl.float32)
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    for key_tile in range(0, num_key_tiles):
        offs_n = key_tile * TILE + tl.arange(0, TILE)
        key_ok = offs_n < seq_len
        k, v = _load_kv_tile(k_head, v_head, block_table_ptr, key_tile * TILE, seq_len,
                             stride_kb, stride_kt, stride_vb, stride_vt,
                             KV_BLOCK_SIZE, TILE, HEAD_DIM)
        keep = (positions[:, None] >= offs_n[None, :]) & row_ok[:, None] & key_ok[None, :]
        m_i, l_i, acc = _online_update(q, k, v, keep, m_i, l_i, acc, scale_log2, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class DevicePlan:
    """One sequence's plan and index flags as the kernel reads them (int32 / int8)."""

    plan_tensors: tuple[torch.Tensor, ...]  # tile_count, tile_index, column_count, column_index
    # columns (reversed) and diagonals packed 32 per int64 word (pack_bits), full_rows and
    # blocks int8
    flags: tuple[torch.Tensor, ...]
    first_query_tile: int
    num_query_tiles: int
    num_tiles: int
    num_tokens_index: int
    tile: int
    num_words: int  # words per head of the packed flags
    # columns and diagonals as int8 [H, N]: only HeadSparseLaunch.byte_mask reads them
    byte_flags: tuple[torch.Tensor, ...] = ()
    # separate_full_rows only: per head, the full rows of this step (absolute positions,
    # ascending, int32 [H, max_rows], padded) and their count (int32 [H])
    full_row_count: torch.Tensor | None = None
    full_row_positions: torch.Tensor | None = None


def estimate_index(query_rows: torch.Tensor, key_cache: torch.Tensor,
                   block_table_row: torch.Tensor, seq_len: int, prompt_len: int,
                   layer_heads, scale: float) -> HeadsIndex:
    """The layer's index for one sequence's rows ``[R, Hq, D]`` (the last ``R`` positions
    before ``seq_len``): the patterns' estimators, in float32 as the reference. Rows and keys
    stay in their dtype here: the estimators convert only what they read
    (``SequenceChunk.head_queries``/``head_keys``), not the whole 128K x 32-head query."""
    keys = gather_sequence_kv(key_cache, block_table_row, seq_len)
    first_pos = seq_len - int(query_rows.shape[0])
    positions = torch.arange(first_pos, seq_len, device=query_rows.device)
    chunk = SequenceChunk(query_rows, positions, keys, int(prompt_len), scale)
    return layer_heads.build_index(chunk)


def prepare_plan(index: HeadsIndex, first_pos: int, seq_len: int, device: torch.device,
                 separate_full_rows: bool = False, device_plan: bool | None = None
                 ) -> DevicePlan:
    """Plan of the query tiles covering positions ``first_pos .. seq_len - 1``. With
    ``separate_full_rows`` the tile plan leaves the full rows out (the rows pass computes
    them whole and overwrites what the tile pass wrote there). ``device_plan``: build the
    lists with the Triton plan kernels (default: when the index is on CUDA)."""
    tile = index.block_size
    row_count = row_positions = None
    if separate_full_rows:
        row_count, row_offsets = compact(index.full_rows[:, first_pos:seq_len])
        if int(row_count.max()) > 0:  # else no rows pass at all
            row_count, row_positions = row_count.int(), (row_offsets + first_pos).int()
        index = replace(index, full_rows=torch.zeros_like(index.full_rows))
    query_tiles = torch.arange(first_pos // tile, (seq_len - 1) // tile + 1, device=device)
    if index.columns.is_cuda if device_plan is None else device_plan:
        plan = make_plan_device(index, first_pos // tile, query_tiles.numel())
    else:
        plan = make_plan(index, query_tiles)
    to_device = lambda t: t.to(device).contiguous()  # noqa: E731
    column_words = pack_bits(index.columns, reverse=True)
    flags = (column_words, pack_bits(index.diagonals), index.full_rows.to(torch.int8),
             index.blocks.to(torch.int8))
    return DevicePlan(
        tuple(to_device(t) for t in (plan.tile_count, plan.tile_index, plan.column_count,
                                     plan.column_index)),
        tuple(to_device(t) for t in flags),
        first_pos // tile, query_tiles.numel(), int(index.blocks.shape[1]), index.num_tokens,
        tile, int(column_words.shape[1]),
        tuple(to_device(t.to(torch.int8)) for t in (index.columns, index.diagonals)),
        row_count, row_positions)


def launch_plan(plan: DevicePlan, query_rows: torch.Tensor, out_rows: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor,
                block_table_row: torch.Tensor, seq_len: int, scale: float,
                launch: HeadSparseLaunch = DEFAULT_LAUNCH) -> None:
    """The kernel over one sequence's rows (``query_rows``/``out_rows`` ``[R, Hq, D]``)."""
    num_q_heads, head_dim = query_rows.shape[1], query_rows.shape[2]
    tile_count, tile_index, column_count, column_index = plan.plan_tensors
    grid = (num_q_heads, plan.num_query_tiles)
    # float32 inputs get true fp32 products (Triton's default would be tf32, ~1e-3 error,
    # and the float32 test cases bound rows at 1e-4); ignored for bf16/fp16
    precision = "ieee" if query_rows.dtype == torch.float32 else "tf32"
    first_pos = seq_len - int(query_rows.shape[0])
    _head_sparse_kernel[grid](
        query_rows, out_rows, key_cache, value_cache, block_table_row,
        tile_count, tile_index, column_count, column_index, *plan.flags, *plan.byte_flags,
        first_pos, seq_len, plan.first_query_tile,
        plan.num_query_tiles, plan.num_tiles, scale * math.log2(math.e),
        query_rows.stride(0), query_rows.stride(1), out_rows.stride(0), out_rows.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        tile_index.shape[2], column_index.shape[2], plan.num_tokens_index, plan.num_words,
        GROUP=num_q_heads // key_cache.shape[1], KV_BLOCK_SIZE=key_cache.shape[2],
        TILE=plan.tile, HEAD_DIM=head_dim, PRECISION=precision, BYTE_MASK=launch.byte_mask,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if plan.full_row_positions is None:
        return
    max_rows = plan.full_row_positions.shape[1]  # >= the most full rows of any head
    _full_rows_kernel[(num_q_heads, -(-max_rows // plan.tile))](
        query_rows, out_rows, key_cache, value_cache, block_table_row, plan.full_row_count,
        plan.full_row_positions, first_pos, seq_len, scale * math.log2(math.e),
        query_rows.stride(0), query_rows.stride(1), out_rows.stride(0), out_rows.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), max_rows,
        GROUP=num_q_heads // key_cache.shape[1], KV_BLOCK_SIZE=key_cache.shape[2],
        TILE=plan.tile, HEAD_DIM=head_dim, PRECISION=precision,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )


def head_sparse_supported(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs: CUDA, a power-of-two head dim >= 16, cache
    blocks of >= 16 tokens (its tile)."""
    head_dim = query.shape[-1]
    return (query.is_cuda and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and key_cache.shape[2] >= 16)


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
    launch: HeadSparseLaunch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """``sparse_prefill``'s contract for a ``LayerHeadPatterns``. The index is estimated in
    torch (the reference's estimators), the plan built in torch, the attention in Triton.
    Needs a power-of-two head dim >= 16 and the layer's block size >= 16 (the tile)."""
    if out is None:
        out = torch.empty_like(query)
    for seq, begin, end, seq_len, prompt_len in sequences_with_rows(query_start_loc, seq_lens,
                                                                    prompt_lens):
        rows_q, rows_out = query[begin:end], out[begin:end]
        index = estimate_index(rows_q, key_cache, block_table[seq], seq_len, prompt_len,
                               layer_heads, scale)
        plan = prepare_plan(index, seq_len - (end - begin), seq_len, query.device,
                            launch.separate_full_rows, launch.device_plan)
        launch_plan(plan, rows_q, rows_out, key_cache, value_cache, block_table[seq], seq_len,
                    scale, launch)
    return out
