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
heads: 134M bools), built with prefix sums and scatters, no sort (a kernel-side builder
that never materialises the tile grid is still to do).
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


def compact(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count ``[...]`` int64, ids ``[..., width]`` int64) of the True positions along the
    last dim, ascending, padded with 0; ``width = max(count, 1)``. A prefix sum and one
    scatter (linear) instead of a sort over every slot: at 256K and 32 heads the tile grid
    has 537M slots, and a segmented sort there costs more than the attention it plans."""
    count = flags.sum(dim=-1)
    width = max(int(count.max()), 1) if flags.numel() else 1
    slot = flags.cumsum(dim=-1) - 1
    # slots of False entries go to a spare column that is cut off afterwards
    slot = torch.where(flags, slot, width)
    positions = torch.arange(flags.shape[-1], device=flags.device).expand_as(flags)
    ids = torch.zeros(*flags.shape[:-1], width + 1, dtype=torch.int64, device=flags.device)
    ids.scatter_(-1, slot, positions)
    return count, ids[..., :width]


def touched_tiles(index: HeadsIndex, query_tiles: torch.Tensor) -> torch.Tensor:
    """Bool ``[H, Qt, Kt]``: the key tiles a kernel computes whole (masked per token) for
    each given query tile: tiles holding a kept diagonal, full-row or block pair, and the
    diagonal tile when a column falls in it. Columns elsewhere are gathered, not tiled."""
    tile = index.block_size
    num_heads, num_tokens = index.num_heads, index.num_tokens
    num_tiles = -(-num_tokens // tile)
    key_tiles = torch.arange(num_tiles, device=index.columns.device)
    distance = query_tiles[:, None] - key_tiles[None, :]  # [Qt, Kt]
    causal = distance >= 0
    by_distance = diagonal_tile_distances(index.diagonals, tile)  # [H, Kt]
    touched = by_distance[:, distance.clamp(min=0)] & causal  # [H, Qt, Kt]
    row_any = torch.nn.functional.pad(index.full_rows, (0, num_tiles * tile - num_tokens))
    row_any = row_any.view(num_heads, num_tiles, tile).any(dim=2)[:, query_tiles]  # [H, Qt]
    touched |= row_any[:, :, None] & causal
    touched |= index.blocks[:, query_tiles][:, :, :num_tiles] & causal
    touched |= column_tiles(index)[:, None, :] & (distance == 0)  # columns in the diagonal tile
    return touched


def column_tiles(index: HeadsIndex) -> torch.Tensor:
    """Bool ``[H, Kt]``: key tiles holding at least one kept column."""
    tile, num_tokens = index.block_size, index.num_tokens
    num_tiles = -(-num_tokens // tile)
    column_any = torch.nn.functional.pad(index.columns, (0, num_tiles * tile - num_tokens))
    return column_any.view(index.num_heads, num_tiles, tile).any(dim=2)


def kept_tiles(index: HeadsIndex, query_tiles: torch.Tensor) -> torch.Tensor:
    """Bool ``[H, Qt, Kt]``: every tile holding a kept pair (touched tiles plus the tiles of
    gathered columns): what a block-sparse kernel such as FlexAttention must visit."""
    key_tiles = torch.arange(-(-index.num_tokens // index.block_size),
                             device=index.columns.device)
    causal = query_tiles[:, None] >= key_tiles[None, :]
    return touched_tiles(index, query_tiles) | (column_tiles(index)[:, None, :] & causal)


def make_plan(index: HeadsIndex, query_tiles: torch.Tensor) -> KernelPlan:
    """The plan of the given query tiles (int64 ids, ascending) of one sequence."""
    tile = index.block_size
    touched = touched_tiles(index, query_tiles)
    tile_count, tile_index = compact(touched)
    # gathered columns: kept columns whose tile this query tile does not visit. Work on
    # each head's column list ([H, C]), not on all N keys: O(H x Qt x C) memory.
    per_head, column_pos = compact(index.columns)  # [H], [H, C] ascending, then padding
    num_columns = column_pos.shape[1]
    column_valid = torch.arange(num_columns, device=column_pos.device)[None, :] < per_head[:, None]
    column_tile = (column_pos // tile)[:, None, :].expand(-1, query_tiles.numel(), -1)
    free = column_valid[:, None, :] & ~torch.gather(touched, 2, column_tile)  # [H, Qt, C]
    free &= column_tile < query_tiles[None, :, None]
    column_count, slots = compact(free)
    column_index = torch.gather(column_pos[:, None, :].expand(-1, query_tiles.numel(), -1),
                                2, slots)
    column_index = torch.where(
        torch.arange(slots.shape[2], device=slots.device) < column_count[..., None],
        column_index, 0)
    return KernelPlan(tile_count.int(), tile_index.int(), column_count.int(),
                      column_index.int(), tile)


def pack_bits(flags: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """int64 ``[H, W]`` words of 32 flags each (bit ``b`` of word ``w`` = flag ``32 w + b``,
    values in ``[0, 2^32)``), ``W = ceil(N / 32)``; padding flags are 0. ``reverse`` packs
    the flags in reversed order (packed index ``32 W - 1 - k`` holds flag ``k``).

    The kernel reads 64-bit windows of these words: one window per row gives that row's
    kept diagonals over a whole key tile, one window per tile its kept columns, so the
    per-token mask costs a shift per pair instead of a byte gather per pair."""
    num_heads, num_flags = flags.shape
    num_words = max(-(-num_flags // 32), 1)
    padded = torch.nn.functional.pad(flags, (0, num_words * 32 - num_flags))
    if reverse:
        padded = padded.flip(-1)
    weights = torch.pow(2, torch.arange(32, device=flags.device, dtype=torch.int64))
    return (padded.view(num_heads, num_words, 32).long() * weights).sum(dim=-1)
