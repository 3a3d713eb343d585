"""``make_plan`` on the device: the same ``KernelPlan`` from two small Triton kernels.

``make_plan`` materialises the ``[H, Qt, Kt]`` tile grid in torch (134M flags at 128K with
32 heads) and compacts it with a prefix sum over int64 slots: about 9 ms of torch passes
at 128K on the H200, more than the whole triangle kernel (minference_NOTES.md). Here one
program per (head, query tile) tests its key tiles and its head's columns directly from
per-head summaries that are ``O(H x N)`` (the diagonal distances as tiles, the full-row and
column tiles, the head's column list) plus the block flags it reads once, and writes its
lists with an in-block prefix sum. Two launches per list kind: a count pass sizes the
lists (one host sync for both maxima), a write pass fills them. The tests compare the
result with ``make_plan`` element for element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention_backends.kernels.head_sparse_plan import (
    KernelPlan,
    column_tiles,
    compact,
    diagonal_tile_distances,
)
from attention_backends.patterns.minference.index import HeadsIndex

BLOCK_K = 256  # key tiles (or columns) a program tests per step


@triton.jit
def _tile_touched(by_distance, row_any, blocks_row, column_tiles, key_tiles, query_tile,
                  valid):
    """``touched_tiles`` for one query tile's ``key_tiles`` (all <= query_tile where valid)."""
    distance = tl.where(valid, query_tile - key_tiles, 0)
    touched = tl.load(by_distance + distance, mask=valid, other=0) != 0
    touched = touched | (row_any != 0)
    touched = touched | (tl.load(blocks_row + key_tiles, mask=valid, other=0) != 0)
    in_diagonal = key_tiles == query_tile  # a column in the diagonal tile lists that tile
    touched = touched | (in_diagonal & (tl.load(column_tiles + key_tiles, mask=valid & in_diagonal,
                                                other=0) != 0))
    return touched & valid


@triton.jit
def _plan_kernel(
    by_distance_ptr, row_any_ptr, blocks_ptr, column_tiles_ptr, column_pos_ptr,
    column_per_head_ptr, tile_count_ptr, tile_index_ptr, column_count_ptr, column_index_ptr,
    first_query_tile, num_query_tiles, num_tiles, max_head_columns, max_tiles, max_columns,
    TILE: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1)
    query_tile = first_query_tile + slot
    plan_row = head * num_query_tiles + slot
    by_distance = by_distance_ptr + head * num_tiles
    column_tiles = column_tiles_ptr + head * num_tiles
    blocks_row = blocks_ptr + (head * num_tiles + query_tile) * num_tiles
    row_any = tl.load(row_any_ptr + head * num_tiles + query_tile)
    offs = tl.arange(0, BLOCK)

    count = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for start in range(0, query_tile + 1, BLOCK):
        key_tiles = start + offs
        touched = _tile_touched(by_distance, row_any, blocks_row, column_tiles, key_tiles,
                                query_tile, key_tiles <= query_tile)
        flags = touched.to(tl.int32)
        if WRITE:
            slots = count + tl.cumsum(flags, axis=0) - 1
            tl.store(tile_index_ptr + plan_row * max_tiles + slots, key_tiles, mask=flags != 0)
        count += tl.sum(flags, axis=0)
    tl.store(tile_count_ptr + plan_row, count)

    # gathered columns: the head's kept columns before the query tile whose tile is not
    # listed (ascending, as the column list is)
    num_columns = tl.load(column_per_head_ptr + head)
    count = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for start in range(0, num_columns, BLOCK):
        index = start + offs
        keys = tl.load(column_pos_ptr + head * max_head_columns + index,
                       mask=index < num_columns, other=0)
        key_tiles = keys // TILE
        valid = (index < num_columns) & (key_tiles < query_tile)
        free = valid & ~_tile_touched(by_distance, row_any, blocks_row, column_tiles, key_tiles,
                                      query_tile, valid)
        flags = free.to(tl.int32)
        if WRITE:
            slots = count + tl.cumsum(flags, axis=0) - 1
            tl.store(column_index_ptr + plan_row * max_columns + slots, keys, mask=flags != 0)
        count += tl.sum(flags, axis=0)
    tl.store(column_count_ptr + plan_row, count)


def make_plan_device(index: HeadsIndex, first_query_tile: int, num_query_tiles: int,
                     block: int = BLOCK_K) -> KernelPlan:
    """``make_plan(index, arange(first_query_tile, first_query_tile + num_query_tiles))``
    on the index's device (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``block``: tiles or
    columns per step (a power of two; tests use small ones to cross step boundaries)."""
    tile, num_heads, num_tokens = index.block_size, index.num_heads, index.num_tokens
    num_tiles = -(-num_tokens // tile)
    device = index.columns.device
    by_distance = diagonal_tile_distances(index.diagonals, tile).to(torch.int8).contiguous()
    row_any = torch.nn.functional.pad(index.full_rows, (0, num_tiles * tile - num_tokens))
    row_any = row_any.view(num_heads, num_tiles, tile).any(dim=2).to(torch.int8).contiguous()
    per_head, column_pos = compact(index.columns)
    columns = (column_tiles(index).to(torch.int8).contiguous(), column_pos.int().contiguous(),
               per_head.int().contiguous())
    blocks = index.blocks[:, :num_tiles, :num_tiles].to(torch.int8).contiguous()
    counts = [torch.empty(num_heads, num_query_tiles, dtype=torch.int32, device=device)
              for _ in range(2)]
    grid = (num_heads, num_query_tiles)

    def launch(tile_index, column_index, write):
        _plan_kernel[grid](
            by_distance, row_any, blocks, columns[0], columns[1], columns[2], counts[0],
            tile_index, counts[1], column_index, first_query_tile, num_query_tiles, num_tiles,
            columns[1].shape[1], tile_index.shape[-1], column_index.shape[-1],
            TILE=tile, WRITE=write, BLOCK=block)

    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    launch(dummy, dummy, False)
    widths = [max(int(width), 1) for width in torch.stack([c.max() for c in counts]).tolist()]
    tile_index, column_index = (
        torch.zeros(num_heads, num_query_tiles, width, dtype=torch.int32, device=device)
        for width in widths)
    launch(tile_index, column_index, True)
    return KernelPlan(counts[0], tile_index, counts[1], column_index, tile)
