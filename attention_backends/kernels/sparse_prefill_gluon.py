"""The streaming rows of the triangle pattern as a persistent Gluon kernel for Hopper (sm_90).

Same function as ``_streaming_rows_kernel`` in ``sparse_prefill_triton.py`` (sinks + local
window for every row that is not a last-q row, GQA-packed tiles, paged K/V), for caches
whose block holds whole key tiles, so that every K/V tile is one TMA box. It is the default
for such caches on Hopper (``GLUON_CONFIG``); the last-q rows stay in Triton.

Why a second kernel (measured, benchmarks/trianglemix_NOTES.md): the Triton version runs
one warpgroup on 128-row tiles; its accumulator (128 x 128 fp32) alone takes half the
registers, ptxas spills loop state and reloads it every iteration (ncu: 35% of the stall
samples wait on local memory), and Triton waits for every tensor-core op before the
softmax that follows. Gluon states layouts, waits and copies explicitly, which buys:

- 64 rows per warpgroup (4 warps on 64-row tiles, two programs per SM): half the
  accumulator registers per thread, no spills;
- FlashAttention-3's in-warpgroup overlap: P(i-1) x V(i-1) is issued after Q x K(i) and
  runs on the tensor cores while the CUDA cores do tile i's softmax;
- separate K and V rings filled by TMA, each slot refilled as soon as its reader is done,
  block-table entries read one copy ahead (no copy waits on a global load);
- persistence: a program walks many work items; the next item's Q tile (one TMA box over
  ``[T, Hkv, group, D]``), sink tile and first K/V tiles are in flight during the current
  item's epilogue, and its scalar plan is loaded while the current item computes.

Importing this module needs triton (Gluon ships with it); launching needs a Hopper GPU.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _find_sequence(query_start_loc_ptr, tile_id, num_seqs, ROWS: gl.constexpr):
    """Largest s with ``query_start_loc[s] // ROWS + s <= tile_id`` (the Triton kernel's
    gapped tile numbering: no prefix sum, no host sync)."""
    low = 0
    high = num_seqs - 1
    while low < high:
        mid = (low + high + 1) // 2
        if gl.load(query_start_loc_ptr + mid) // ROWS + mid <= tile_id:
            low = mid
        else:
            high = mid - 1
    return low


@gluon.jit
def _issue_copy(desc, bufs, ready, slot, physical, kv_head, slot_in_block, pred):
    """Start the TMA copy of one K or V tile into ring slot ``slot``."""
    bar = ready.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [physical, kv_head, slot_in_block, 0], bar,
                                    bufs.index(slot), pred)  # fmt: skip


@gluon.jit
def _block_of(block_table_row_ptr, tile_start, pred, KV_BLOCK_SIZE: gl.constexpr):
    """Physical cache block holding ``tile_start`` (0 where ``pred`` is false)."""
    return gl.load(block_table_row_ptr + tile_start // KV_BLOCK_SIZE, mask=pred, other=0)


@gluon.jit
def _masked(scores, query_pos, keys, sink_tokens, window_tokens):
    """The streaming mask on one tile: causal, and inside the window or a sink."""
    distance = gl.expand_dims(query_pos, 1) - gl.expand_dims(keys, 0)
    keep = (distance >= 0) & ((gl.expand_dims(keys, 0) < sink_tokens) | (distance < window_tokens))
    return gl.where(keep, scores, float("-inf"))


@gluon.jit
def _softmax_step(scores, row_max, row_sum, qk_scale, dtype: gl.constexpr,
                  p_layout: gl.constexpr):  # fmt: skip
    """Online-softmax update for one score tile: (P in the A-operand layout of the PV
    product, rescale factor of the accumulator rows, new max, new sum)."""
    new_max = gl.maximum(row_max, gl.max(scores, axis=1) * qk_scale)
    rescale = gl.exp2(row_max - new_max)
    probs = gl.exp2(scores * qk_scale - gl.expand_dims(new_max, 1))
    row_sum = row_sum * rescale + gl.sum(probs, axis=1)
    return gl.convert_layout(probs.to(dtype), p_layout), rescale, new_max, row_sum


@gluon.jit
def _plan_item(work, num_work, num_kv_heads, query_start_loc_ptr, seq_lens_ptr, prompt_lens_ptr,
               block_table_ptr, stride_bt, num_seqs, sink_tokens, window_tokens, last_q_tokens,
               HAS_LAST_ROWS: gl.constexpr, ROWS: gl.constexpr,
               BLOCK_N: gl.constexpr):  # fmt: skip
    """Where work item ``work`` (a row tile of one KV head) reads and writes: (valid,
    kv_head, first token, first row position, last row position, first window key,
    window tiles, first and end of the unmasked tiles, sink keys, block-table row)."""
    clamped = gl.minimum(work, num_work - 1)  # past the end: loads stay in bounds
    tile_id = clamped // num_kv_heads
    kv_head = clamped % num_kv_heads
    seq = _find_sequence(query_start_loc_ptr, tile_id, num_seqs, ROWS)
    query_begin = gl.load(query_start_loc_ptr + seq)
    query_len = gl.load(query_start_loc_ptr + seq + 1) - query_begin
    row_begin = (tile_id - (query_begin // ROWS + seq)) * ROWS
    seq_len = gl.load(seq_lens_ptr + seq)
    tile_first_pos = seq_len - query_len + row_begin
    rows_end_pos = seq_len
    if HAS_LAST_ROWS:
        prompt_len = gl.maximum(gl.load(prompt_lens_ptr + seq), seq_len)
        rows_end_pos = gl.minimum(seq_len, gl.maximum(prompt_len - last_q_tokens, 0))
    tile_end_pos = gl.minimum(tile_first_pos + ROWS, rows_end_pos)
    valid = (work < num_work) & (row_begin < query_len) & (tile_end_pos > tile_first_pos)
    max_row_pos = tile_end_pos - 1
    # window tiles cover [window_start, max_row_pos]; sinks are the keys before them
    window_start = gl.maximum(tile_first_pos - window_tokens + 1, 0) // BLOCK_N * BLOCK_N
    num_tiles = gl.cdiv(max_row_pos + 1 - window_start, BLOCK_N) * valid.to(gl.int32)
    window_edge = gl.maximum(max_row_pos - window_tokens + 1 - window_start, 0)
    full_begin = gl.minimum(gl.cdiv(window_edge, BLOCK_N), num_tiles)
    full_end = gl.minimum(
        gl.maximum((tile_first_pos + 1 - window_start) // BLOCK_N, full_begin), num_tiles
    )
    sink_end = gl.minimum(sink_tokens, window_start) * valid.to(gl.int32)
    return (valid, kv_head, query_begin + row_begin, tile_first_pos, max_row_pos, window_start,
            num_tiles, full_begin, full_end, sink_end, block_table_ptr + seq * stride_bt)


@gluon.jit
def _start_item(valid, kv_head, first_token, window_start, num_tiles, sink_end, block_table_row,
                q_desc, key_desc, value_desc, sink_key_desc, sink_value_desc, q_smem, q_ready,
                k_bufs, v_bufs, k_ready, v_ready, sink_k, sink_v, sink_ready, uses,
                NUM_STAGES: gl.constexpr, KV_BLOCK_SIZE: gl.constexpr,
                BLOCK_N: gl.constexpr):  # fmt: skip
    """Issue the copies a work item needs first: its Q tile, its sink tile, and one K and one
    V tile per ring slot (ring uses ``uses`` .. ``uses + NUM_STAGES - 1``)."""
    mbarrier.expect(q_ready, q_desc.block_type.nbytes, pred=valid)
    tma.async_copy_global_to_shared(q_desc, [first_token, kv_head, 0, 0], q_ready, q_smem, valid)
    has_sinks = sink_end > 0
    sink_block = gl.load(block_table_row, mask=has_sinks, other=0)
    mbarrier.expect(
        sink_ready, sink_key_desc.block_type.nbytes + sink_value_desc.block_type.nbytes,
        pred=has_sinks,
    )  # fmt: skip
    tma.async_copy_global_to_shared(sink_key_desc, [sink_block, kv_head, 0, 0], sink_ready,
                                    sink_k, has_sinks)  # fmt: skip
    tma.async_copy_global_to_shared(sink_value_desc, [sink_block, kv_head, 0, 0], sink_ready,
                                    sink_v, has_sinks)  # fmt: skip
    for stage in gl.static_range(NUM_STAGES):
        tile_start = window_start + stage * BLOCK_N
        pred = stage < num_tiles
        physical = _block_of(block_table_row, tile_start, pred, KV_BLOCK_SIZE)
        slot = (uses + stage) % NUM_STAGES
        _issue_copy(key_desc, k_bufs, k_ready, slot, physical, kv_head,
                    tile_start % KV_BLOCK_SIZE, pred)  # fmt: skip
        _issue_copy(value_desc, v_bufs, v_ready, slot, physical, kv_head,
                    tile_start % KV_BLOCK_SIZE, pred)  # fmt: skip


@gluon.jit(do_not_specialize=["num_work", "num_seqs", "sink_tokens", "window_tokens",
                              "last_q_tokens"])  # fmt: skip
def _streaming_rows_gluon_kernel(
    q_desc, key_desc, value_desc, sink_key_desc, sink_value_desc, out_ptr,
    block_table_ptr, query_start_loc_ptr, seq_lens_ptr, prompt_lens_ptr,
    stride_ot, stride_oh, stride_bt,
    num_work, num_kv_heads, num_seqs, qk_scale, sink_tokens, window_tokens, last_q_tokens,
    HAS_LAST_ROWS: gl.constexpr, GROUP: gl.constexpr, ROWS: gl.constexpr,
    BLOCK_N: gl.constexpr, SINK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
    KV_BLOCK_SIZE: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BLOCK_M: gl.constexpr = ROWS * GROUP
    dtype: gl.constexpr = key_desc.dtype
    # Rows split over the warps (16 per warp, 64 per warpgroup); one row's keys stay in one
    # warp, so the row reductions are shuffles, never shared memory.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    sink_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, SINK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    io_layout: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[1, 8], threads_per_warp=[32 * 8 // HEAD_DIM, HEAD_DIM // 8],
        warps_per_cta=[num_warps, 1], order=[1, 0],
    )  # fmt: skip

    # --- shared memory, allocated once: Q, the K and V rings, the sink tile -------------
    # K and V have rings of their own: K(i) is free once Q x K(i) is done, V(i) only once
    # P(i) x V(i) is, an iteration later; each is refilled as soon as it is free, so every
    # copy is issued at least one iteration before it is waited for. Ring uses are counted
    # over the program's whole life (``uses``), which gives every wait its slot and phase.
    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])
    k_bufs = gl.allocate_shared_memory(
        dtype, [NUM_STAGES] + key_desc.block_type.shape, key_desc.layout
    )
    v_bufs = gl.allocate_shared_memory(
        dtype, [NUM_STAGES] + value_desc.block_type.shape, value_desc.layout
    )
    sink_k = gl.allocate_shared_memory(dtype, sink_key_desc.block_type.shape, sink_key_desc.layout)
    sink_v = gl.allocate_shared_memory(
        dtype, sink_value_desc.block_type.shape, sink_value_desc.layout
    )
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    sink_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(stage), count=1)
        mbarrier.init(v_ready.index(stage), count=1)
    mbarrier.init(q_ready, count=1)
    mbarrier.init(sink_ready, count=1)

    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    # Persistent: each program walks work items pid, pid + nprog, ...; an item's first
    # copies are issued before the previous item's epilogue, and its plan (scalar loads)
    # is made while the previous item computes.
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    uses = pid * 0
    q_phase = pid * 0
    sink_phase = pid * 0
    (valid, kv_head, first_token, tile_first_pos, max_row_pos, window_start, num_tiles,
     full_begin, full_end, sink_end, block_table_row) = _plan_item(
        pid, num_work, num_kv_heads, query_start_loc_ptr, seq_lens_ptr, prompt_lens_ptr,
        block_table_ptr, stride_bt, num_seqs, sink_tokens, window_tokens, last_q_tokens,
        HAS_LAST_ROWS, ROWS, BLOCK_N,
    )  # fmt: skip
    _start_item(valid, kv_head, first_token, window_start, num_tiles, sink_end, block_table_row,
                q_desc, key_desc, value_desc, sink_key_desc, sink_value_desc, q_smem, q_ready,
                k_bufs, v_bufs, k_ready, v_ready, sink_k, sink_v, sink_ready, uses,
                NUM_STAGES, KV_BLOCK_SIZE, BLOCK_N)  # fmt: skip
    for work in range(pid, num_work, nprog):
        (next_valid, next_kv_head, next_first_token, next_tile_first_pos, next_max_row_pos,
         next_window_start, next_num_tiles, next_full_begin, next_full_end, next_sink_end,
         next_block_table_row) = _plan_item(
            work + nprog, num_work, num_kv_heads, query_start_loc_ptr, seq_lens_ptr,
            prompt_lens_ptr, block_table_ptr, stride_bt, num_seqs, sink_tokens, window_tokens,
            last_q_tokens, HAS_LAST_ROWS, ROWS, BLOCK_N,
        )  # fmt: skip
        if valid:
            query_pos = tile_first_pos + gl.arange(0, BLOCK_M, layout=row_s) // GROUP
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
            row_max = gl.full([BLOCK_M], -1.0e30, gl.float32, row_s)  # finite: no NaN
            row_sum = gl.zeros([BLOCK_M], gl.float32, row_s)
            # the next K copy goes to tile NUM_STAGES; its block-table entry is read now
            k_next_start = window_start + NUM_STAGES * BLOCK_N
            k_next_block = _block_of(block_table_row, k_next_start, NUM_STAGES < num_tiles,
                                     KV_BLOCK_SIZE)  # fmt: skip

            # tile 0: scores and softmax; its P x V is issued in the next iteration
            mbarrier.wait(q_ready, q_phase)
            slot = uses % NUM_STAGES
            mbarrier.wait(k_ready.index(slot), (uses // NUM_STAGES) & 1)
            k_t = k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            scores = warpgroup_mma(q_tile, k_t, s_zero, use_acc=False, is_async=True)
            scores = warpgroup_mma_wait(0, deps=(scores,))
            _issue_copy(key_desc, k_bufs, k_ready, slot, k_next_block, kv_head,
                        k_next_start % KV_BLOCK_SIZE, NUM_STAGES < num_tiles)  # fmt: skip
            v_next_start = k_next_start  # V(NUM_STAGES) follows at tile 1
            v_next_block = k_next_block
            k_next_start += BLOCK_N
            k_next_block = _block_of(block_table_row, k_next_start,
                                     NUM_STAGES + 1 < num_tiles, KV_BLOCK_SIZE)  # fmt: skip
            if (full_begin > 0) | (full_end == 0):
                scores = _masked(scores, query_pos, window_start + offs_n, sink_tokens,
                                 window_tokens)  # fmt: skip
            p_prev, rescale, row_max, row_sum = _softmax_step(
                scores, row_max, row_sum, qk_scale, dtype, p_layout
            )

            # tiles 1..: Q x K(i), then P(i-1) x V(i-1) in flight during tile i's softmax
            for tile in range(1, num_tiles):
                use = uses + tile
                slot = use % NUM_STAGES
                prev_slot = (use - 1) % NUM_STAGES
                mbarrier.wait(k_ready.index(slot), (use // NUM_STAGES) & 1)
                k_t = k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
                scores = warpgroup_mma(q_tile, k_t, s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(prev_slot), ((use - 1) // NUM_STAGES) & 1)
                v_prev = v_bufs.index(prev_slot).reshape([BLOCK_N, HEAD_DIM])
                acc = warpgroup_mma(p_prev, v_prev, acc, is_async=True)
                scores = warpgroup_mma_wait(1, deps=(scores,))  # Q x K(i) done; P x V runs
                _issue_copy(key_desc, k_bufs, k_ready, slot, k_next_block, kv_head,
                            k_next_start % KV_BLOCK_SIZE,
                            tile + NUM_STAGES < num_tiles)  # fmt: skip
                if (tile < full_begin) | (tile >= full_end):
                    scores = _masked(scores, query_pos, window_start + tile * BLOCK_N + offs_n,
                                     sink_tokens, window_tokens)  # fmt: skip
                p_prev, rescale, row_max, row_sum = _softmax_step(
                    scores, row_max, row_sum, qk_scale, dtype, p_layout
                )
                acc = warpgroup_mma_wait(0, deps=(acc,))  # P(i-1) x V(i-1) done: V slot free
                _issue_copy(value_desc, v_bufs, v_ready, prev_slot, v_next_block, kv_head,
                            v_next_start % KV_BLOCK_SIZE,
                            tile - 1 + NUM_STAGES < num_tiles)  # fmt: skip
                v_next_start = k_next_start
                v_next_block = k_next_block
                k_next_start += BLOCK_N
                k_next_block = _block_of(block_table_row, k_next_start,
                                         tile + NUM_STAGES + 1 < num_tiles,
                                         KV_BLOCK_SIZE)  # fmt: skip
                acc = acc * gl.expand_dims(gl.convert_layout(rescale, row_o), 1)

            last_use = uses + num_tiles - 1
            mbarrier.wait(v_ready.index(last_use % NUM_STAGES), (last_use // NUM_STAGES) & 1)
            v_last = v_bufs.index(last_use % NUM_STAGES).reshape([BLOCK_N, HEAD_DIM])
            acc = warpgroup_mma(p_prev, v_last, acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))

            # sinks: keys [0, sink_end), before every row's window
            if sink_end > 0:
                mbarrier.wait(sink_ready, sink_phase)
                sink_k_t = sink_k.reshape([SINK_N, HEAD_DIM]).permute((1, 0))
                sink_scores = warpgroup_mma(
                    q_tile, sink_k_t, gl.zeros([BLOCK_M, SINK_N], gl.float32, sink_layout),
                    use_acc=False, is_async=True,
                )  # fmt: skip
                sink_scores = warpgroup_mma_wait(0, deps=(sink_scores,))
                sink_keys = gl.arange(0, SINK_N, layout=gl.SliceLayout(0, sink_layout))
                sink_scores = gl.where(gl.expand_dims(sink_keys < sink_end, 0), sink_scores,
                                       float("-inf"))  # fmt: skip
                sink_rows: gl.constexpr = gl.SliceLayout(1, sink_layout)
                p_sink, sink_rescale, sink_max, sink_sum = _softmax_step(
                    sink_scores, gl.convert_layout(row_max, sink_rows),
                    gl.convert_layout(row_sum, sink_rows), qk_scale, dtype, p_layout,
                )  # fmt: skip
                acc = acc * gl.expand_dims(gl.convert_layout(sink_rescale, row_o), 1)
                sink_v_2d = sink_v.reshape([SINK_N, HEAD_DIM])
                acc = warpgroup_mma(p_sink, sink_v_2d, acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                row_sum = gl.convert_layout(sink_sum, row_s)

            # Q, the sink tile and every ring slot are free: start the next item's copies,
            # then normalise and store this one while they fly
            _start_item(next_valid, next_kv_head, next_first_token, next_window_start,
                        next_num_tiles, next_sink_end, next_block_table_row, q_desc, key_desc,
                        value_desc, sink_key_desc, sink_value_desc, q_smem, q_ready, k_bufs,
                        v_bufs, k_ready, v_ready, sink_k, sink_v, sink_ready, uses + num_tiles,
                        NUM_STAGES, KV_BLOCK_SIZE, BLOCK_N)  # fmt: skip
            inverse = 1.0 / gl.convert_layout(gl.where(row_sum > 0.0, row_sum, 1.0), row_o)
            attended = gl.convert_layout((acc * gl.expand_dims(inverse, 1)).to(dtype), io_layout)
            token = (first_token + offs_m // GROUP).to(gl.int64)
            q_head = kv_head * GROUP + offs_m % GROUP
            row_ok = tile_first_pos + offs_m // GROUP <= max_row_pos
            gl.store(
                out_ptr + gl.expand_dims(token * stride_ot + q_head * stride_oh, 1)
                + gl.expand_dims(offs_d, 0),
                attended, mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(offs_d < HEAD_DIM, 0),
            )  # fmt: skip
        else:
            _start_item(next_valid, next_kv_head, next_first_token, next_window_start,
                        next_num_tiles, next_sink_end, next_block_table_row, q_desc, key_desc,
                        value_desc, sink_key_desc, sink_value_desc, q_smem, q_ready, k_bufs,
                        v_bufs, k_ready, v_ready, sink_k, sink_v, sink_ready, uses,
                        NUM_STAGES, KV_BLOCK_SIZE, BLOCK_N)  # fmt: skip
        uses += num_tiles
        q_phase ^= valid.to(gl.int32)
        sink_phase ^= (sink_end > 0).to(gl.int32)
        valid = next_valid
        kv_head = next_kv_head
        first_token = next_first_token
        tile_first_pos = next_tile_first_pos
        max_row_pos = next_max_row_pos
        window_start = next_window_start
        num_tiles = next_num_tiles
        full_begin = next_full_begin
        full_end = next_full_end
        sink_end = next_sink_end
        block_table_row = next_block_table_row

    for stage in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_ready.index(stage))
        mbarrier.invalidate(v_ready.index(stage))
    mbarrier.invalidate(q_ready)
    mbarrier.invalidate(sink_ready)


def _box_descriptor(cache: torch.Tensor, keys: int) -> TensorDescriptor:
    """TMA descriptor over a 4-D cache view ``[blocks, Hkv, block_size, D]``: one box is
    ``keys`` consecutive slots of one KV head in one block."""
    box = [1, 1, keys, cache.shape[-1]]
    dtype = gl.bfloat16 if cache.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(box, dtype)
    return TensorDescriptor(cache, list(cache.shape), list(cache.stride()), box, layout)


def gluon_streaming_supported(query: torch.Tensor, key_cache: torch.Tensor, block_n: int,
                              sink_tokens: int, group: int, block_m: int) -> bool:  # fmt: skip
    """Whether the Gluon kernel runs these inputs: Hopper, bf16/fp16, head dim 64 or 128,
    whole key tiles per cache block, sinks within one block, a power-of-two GQA group that
    divides the tile, heads adjacent in memory (the Q tile is one TMA box)."""
    head_dim, kv_block_size = key_cache.shape[-1], key_cache.shape[2]
    return (
        query.is_cuda
        and torch.cuda.get_device_capability(query.device)[0] == 9
        and query.dtype in (torch.bfloat16, torch.float16)
        and head_dim in (64, 128)
        and kv_block_size % block_n == 0
        and sink_tokens <= min(64, kv_block_size)
        and group & (group - 1) == 0
        and block_m % group == 0
        and query.stride(1) == head_dim
        and query.stride(0) % 8 == 0
        and query.data_ptr() % 16 == 0
    )


def _query_descriptor(query: torch.Tensor, group: int, rows: int) -> TensorDescriptor:
    """TMA descriptor over ``query`` seen as ``[T, Hkv, group, D]``: one box is ``rows``
    tokens x the GQA group of one KV head, i.e. the GQA-packed Q tile."""
    num_tokens, num_q_heads, head_dim = query.shape
    grouped = query.as_strided(
        (num_tokens, num_q_heads // group, group, head_dim),
        (query.stride(0), group * query.stride(1), query.stride(1), 1),
    )
    box = [rows, 1, group, head_dim]
    dtype = gl.bfloat16 if query.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(box, dtype)
    return TensorDescriptor(grouped, list(grouped.shape), list(grouped.stride()), box, layout)


_SM_COUNTS: dict[int, int] = {}


def launch_streaming_rows_gluon(
    query, key_cache, value_cache, out, block_table, query_start_loc, seq_lens, prompt_lens,
    qk_scale: float, sink_tokens: int, window_tokens: int, last_q_tokens: int,
    group: int, block_m: int, block_n: int, num_stages: int, num_warps: int,
    programs_per_sm: int,
) -> None:  # fmt: skip
    """Launch the persistent Gluon streaming-rows kernel: ``programs_per_sm`` programs per
    SM walk the work items (row tiles x KV heads, numbered like the Triton kernel's grid)."""
    num_tokens = query.shape[0]
    rows = block_m // group
    sink_n = max(16, 1 << max(sink_tokens - 1, 0).bit_length())
    num_seqs, num_kv_heads = seq_lens.shape[0], key_cache.shape[1]
    num_work = (num_tokens // rows + num_seqs) * num_kv_heads
    device = query.device.index if query.device.index is not None else torch.cuda.current_device()
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    grid = (min(num_work, programs_per_sm * _SM_COUNTS[device]),)
    _streaming_rows_gluon_kernel[grid](
        _query_descriptor(query, group, rows),
        _box_descriptor(key_cache, block_n), _box_descriptor(value_cache, block_n),
        _box_descriptor(key_cache, sink_n), _box_descriptor(value_cache, sink_n), out,
        block_table, query_start_loc, seq_lens, prompt_lens,
        out.stride(0), out.stride(1), block_table.stride(0),
        num_work, num_kv_heads, num_seqs, qk_scale, sink_tokens, window_tokens, last_q_tokens,
        HAS_LAST_ROWS=last_q_tokens > 0, GROUP=group, ROWS=rows, BLOCK_N=block_n,
        SINK_N=sink_n, HEAD_DIM=key_cache.shape[-1], KV_BLOCK_SIZE=key_cache.shape[2],
        NUM_STAGES=num_stages, num_warps=num_warps,
    )  # fmt: skip
