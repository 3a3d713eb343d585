"""What a tiled kernel visits for a ``HeadsIndex``: per (head, query tile) a list of key
tiles computed whole (with the per-token mask applied inside) and a list of single key
columns gathered outside those tiles (MInference's block_offset / column_index split).

Tiles are square, ``tile`` tokens on absolute positions, and equal to the index's block size.
A key tile is listed iff the diagonals, full rows or blocks keep a pair in it (or a column
falls in the diagonal tile); every other kept column becomes a gathered column. The
diagonal tile is always listed when diagonal 0 is kept (every pattern keeps it), so a
gathered column lies strictly before the query tile and is causal for all its rows. Tiles
and gathered columns never overlap, so no pair is counted twice. Plain torch, any device;
memory ``O(H x tiles^2)`` bools plus the lists (at 128K, 64-token tiles and 32
heads: 134M bools; a kernel-side builder is for the GPU session).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.patterns.minference.index import HeadsIndex


@dataclass(frozen=True)
class KernelPlan:
    """int32 lists, padded; ``[H, num_query_tiles, ...]`` over the sequence's tiles."""

    tile_count: torch.Tensor  # [H, Qt]
    tile_index: torch.Tensor  # [H, Qt, max_tiles] key tile ids, ascending
    column_count: torch.Tensor  # [H, Qt]
    column_index: torch.Tensor  # [H, Qt, max_columns] key positions, ascending
    tile: int


def diagonal_tile_distances(diagonals: torch.Tensor, tile: int) -> torch.Tensor:
    """Bool ``[H, num_tiles]``: distance ``t = query_tile - key_tile`` holds a kept diagonal
    pair iff some kept offset ``s`` has ``|s - t * tile| < tile``."""
    num_heads, num_tokens = diagonals.shape
    num_tiles = -(-num_tokens // tile)
    padded = torch.nn.functional.pad(diagonals.float(), (tile - 1, num_tiles * tile + tile))
    window = torch.nn.functional.max_pool1d(padded[:, None], 2 * tile - 1, stride=1)[:, 0]
    # window[j] = any(diagonals[j - tile + 1 .. j + tile - 1]); sample at j = t * tile
    return window[:, torch.arange(num_tiles, device=diagonals.device) * tile] > 0


def make_plan(index: HeadsIndex, query_tiles: torch.Tensor) -> KernelPlan:
    """The plan of the given query tiles (int64 ids, ascending) of one sequence."""
    tile = index.block_size
    num_heads, num_tokens = index.num_heads, index.num_tokens
    num_tiles = -(-num_tokens // tile)
    device = index.columns.device
    key_tiles = torch.arange(num_tiles, device=device)
    distance = query_tiles[:, None] - key_tiles[None, :]  # [Qt, Kt]
    causal = distance >= 0
    by_distance = diagonal_tile_distances(index.diagonals, tile)  # [H, Kt]
    touched = by_distance[:, distance.clamp(min=0)] & causal  # [H, Qt, Kt]
    row_any = torch.nn.functional.pad(index.full_rows, (0, num_tiles * tile - num_tokens))
    row_any = row_any.view(num_heads, num_tiles, tile).any(dim=2)[:, query_tiles]  # [H, Qt]
    touched |= row_any[:, :, None] & causal
    touched |= index.blocks[:, query_tiles][:, :, :num_tiles] & causal
    column_any = torch.nn.functional.pad(index.columns, (0, num_tiles * tile - num_tokens))
    column_any = column_any.view(num_heads, num_tiles, tile).any(dim=2)  # [H, Kt]
    touched |= column_any[:, None, :] & (distance == 0)  # columns in the diagonal tile
    tile_count = touched.sum(dim=2)
    max_tiles = max(int(tile_count.max()), 1)
    # stable sort puts touched tiles first, in ascending order
    order = torch.sort((~touched).to(torch.int8), dim=2, stable=True).indices[:, :, :max_tiles]
    tile_index = torch.where(torch.arange(max_tiles, device=device) < tile_count[..., None],
                             order, 0)
    # gathered columns: kept columns whose tile this query tile does not visit. Work on
    # each head's column list ([H, C]), not on all N keys: O(H x Qt x C) memory.
    per_head = index.columns.sum(dim=1)
    num_columns = max(int(per_head.max()), 1)
    column_pos = torch.sort((~index.columns).to(torch.int8), dim=1, stable=True).indices
    column_pos = column_pos[:, :num_columns]  # [H, C] ascending kept columns, then padding
    column_valid = torch.arange(num_columns, device=device)[None, :] < per_head[:, None]
    column_tile = (column_pos // tile)[:, None, :].expand(-1, query_tiles.numel(), -1)
    free = column_valid[:, None, :] & ~torch.gather(touched, 2, column_tile)  # [H, Qt, C]
    free &= column_tile < query_tiles[None, :, None]
    column_count = free.sum(dim=2)
    max_columns = max(int(column_count.max()), 1)
    slots = torch.sort((~free).to(torch.int8), dim=2, stable=True).indices[:, :, :max_columns]
    column_index = torch.gather(column_pos[:, None, :].expand(-1, query_tiles.numel(), -1),
                                2, slots)
    column_index = torch.where(torch.arange(max_columns, device=device) < column_count[..., None],
                               column_index, 0)
    return KernelPlan(tile_count.int(), tile_index.int(), column_count.int(),
                      column_index.int(), tile)
