"""GEMM that consumes tile order directly: no untile pass, dequant fused per strip chunk.

`TileQuantLinear.__call__` dequantizes the whole weight to an fp32 W-hat in tile order,
untiles it with a transpose copy, then runs one matmul: three fp32-sized memory passes
(NOTES: 90% of its time). Here the weight is walked in its stored order, one chunk of
output strips at a time (a strip = all K tiles of `tile_n` output columns, contiguous in
tile order: the unit one DMA descriptor moves into TCM on the NPU, digest §2.2):

1. dequantize the chunk's super-groups (LUT) into a small fp32 buffer that stays in cache;
2. multiply it as stored. With row-pair interleave a strip is, read flat, a matrix
   A[q, 2c + r] = W[2q + r, c] of shape [K/2, 2 tile_n]. So with x_e = x[:, 0::2] and
   x_o = x[:, 1::2] (a permutation of the small activation, not of the big weight):
       y[:, c] = (x_e @ A)[:, 2c] + (x_o @ A)[:, 2c + 1]
   i.e. one matmul of the stacked [x_e; x_o] ([2M, K/2]) by A, keeping half the outputs.
   That spends 2x the multiply-adds of x @ W to avoid any weight copy; at decode (M = 1)
   the kernel is bound by memory and Python overhead, not by flops. Without interleave a
   strip is a plain [K, tile_n] block and x @ A is exact-size.

Numerics: the same x-hat and W-hat as `TileQuantLinear` (products of fp32 values, fp32
accumulation in another order), so the same `gemm.error_bound`; against the float64
`gemm.gemm_ref` it differs only by fp32 accumulation, <= 2 K u (|x-hat| @ |W-hat|) per element.
"""

from __future__ import annotations

import numpy as np

from mobile.npu.gemm import Activation, TileQuantLinear, quantize_activation
from mobile.npu.quant import GROUPS_PER_SUPER, dequant_lut

DEFAULT_CHUNK_BYTES = 256 * 1024  # fp32 W-hat per chunk: fits this CPU's L2 with room


def strips_per_chunk(lin: TileQuantLinear, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many whole strips fit `chunk_bytes` of fp32 W-hat (at least one)."""
    strip_bytes = 4 * lin.k * lin.tile.tile_n
    return max(1, min(lin.n // lin.tile.tile_n, chunk_bytes // strip_bytes))


def _dequant_strips(lin: TileQuantLinear, first: int, count: int) -> np.ndarray:
    """fp32 W-hat of strips [first, first + count) in tile order, flat."""
    per_strip = lin.k * lin.tile.tile_n
    lo, hi = first * per_strip, (first + count) * per_strip
    if lin.packed is not None:  # int4 super-groups: 256 weights each, in tile order
        return dequant_lut(lin.packed[lo // 256: hi // 256])
    g = lin.group_size
    codes, scales = lin._codes[lo // g: hi // g], lin._scales[lo // g: hi // g]
    return (codes.astype(np.float32) * scales.astype(np.float32)[:, None]).reshape(-1)


def tile_order_matmul(lin: TileQuantLinear, x: np.ndarray, act: Activation = "fp16",
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """x [M, K] float -> y [M, N] fp32, reading the packed weight in tile order only."""
    k, n, tile = lin.k, lin.n, lin.tile
    tn = tile.tile_n
    if lin.packed is not None and (k * tn) % (GROUPS_PER_SUPER * lin.group_size):
        raise ValueError("a strip must hold whole super-groups")
    if lin.packed is None and (k * tn) % lin.group_size:
        raise ValueError("a strip must hold whole groups")
    xq, x_scale = quantize_activation(x, act)
    m = xq.shape[0]
    pairs = tile.row_pair_interleave
    # [x_e; x_o]: the activation permuted once instead of the weight (see module docstring).
    lhs = np.ascontiguousarray(np.concatenate([xq[:, 0::2], xq[:, 1::2]])) if pairs else xq
    y = np.empty((m, n), dtype=np.float32)
    step = strips_per_chunk(lin, chunk_bytes)
    for first in range(0, n // tn, step):
        count = min(step, n // tn - first)
        w = _dequant_strips(lin, first, count)
        cols = slice(first * tn, (first + count) * tn)
        if pairs:
            r = np.matmul(lhs, w.reshape(count, k // 2, 2 * tn))  # [count, 2M, 2tn]
            part = r[:, :m, 0::2] + r[:, m:, 1::2]  # [count, M, tn]
        else:
            part = np.matmul(lhs, w.reshape(count, k, tn))  # [count, M, tn]
        y[:, cols] = part.transpose(1, 0, 2).reshape(m, count * tn)
    return y if x_scale is None else y * x_scale
