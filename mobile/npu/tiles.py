"""Tile order: the permutation that lays a weight matrix out the way an NPU matrix unit reads it.

Digest §2.2 (HMX): a weight W[K, N] (y = x @ W) is cut into tiles of `tile_k x tile_n`
(32 x 32 fp16 = 2 KiB on HMX); tiles are stored column-major at tile level (all K tiles of
the first N block, then the next N block), and inside a tile each pair of rows is
interleaved: element order (row // 2, col, row % 2). Quantization groups are then runs of
consecutive elements *in this order*, so a group of 32 is a 2 x 16 block of W, and a
dequantized group streams into the tile buffer contiguously (no scatter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileShape:
    """Tile geometry; `row_pair_interleave` reproduces HMX's 2-row interleave inside a tile."""

    tile_k: int = 32
    tile_n: int = 32
    row_pair_interleave: bool = True

    @property
    def elements(self) -> int:
        return self.tile_k * self.tile_n

    def check(self, k: int, n: int) -> None:
        if k % self.tile_k or n % self.tile_n:
            raise ValueError(f"matrix {k}x{n} is not a multiple of tile "
                             f"{self.tile_k}x{self.tile_n}")
        if self.row_pair_interleave and self.tile_k % 2:
            raise ValueError("row-pair interleave needs an even tile_k")


def tile_permutation(k: int, n: int, tile: TileShape) -> np.ndarray:
    """Flat indices into W.ravel() (row-major [K, N]) listed in tile order; shape [K*N], int64."""
    tile.check(k, n)
    tk, tn = tile.tile_k, tile.tile_n
    rows = np.arange(k).reshape(k // tk, tk)  # [k_tiles, tk]
    cols = np.arange(n).reshape(n // tn, tn)  # [n_tiles, tn]
    if tile.row_pair_interleave:
        # In-tile order (row // 2, col, row % 2): index array [tk//2, tn, 2].
        r = rows.reshape(k // tk, 1, tk // 2, 1, 2)  # [kt, 1, tk/2, 1, 2]
        c = cols.reshape(1, n // tn, 1, tn, 1)  # [1, nt, 1, tn, 1]
        flat = r * n + c  # [kt, nt, tk/2, tn, 2]
    else:
        r = rows.reshape(k // tk, 1, tk, 1)
        c = cols.reshape(1, n // tn, 1, tn)
        flat = r * n + c  # [kt, nt, tk, tn]
    # Tile-level column-major: N blocks outermost, K blocks inside.
    flat = np.swapaxes(flat, 0, 1)
    return flat.reshape(-1)


def to_tile_order(w: np.ndarray, tile: TileShape) -> np.ndarray:
    """W [K, N] -> 1-D array of its elements in tile order (same dtype)."""
    k, n = w.shape
    return np.ascontiguousarray(w).reshape(-1)[tile_permutation(k, n, tile)]


def from_tile_order(flat: np.ndarray, k: int, n: int, tile: TileShape) -> np.ndarray:
    """Inverse of `to_tile_order`: 1-D tile-ordered array -> W [K, N]."""
    out = np.empty(k * n, dtype=flat.dtype)
    out[tile_permutation(k, n, tile)] = flat
    return out.reshape(k, n)
