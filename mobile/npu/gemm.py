"""Tile-quantized GEMM y = x @ W-hat (digest §2.2-2.3, W4A16 / W8A16 / W4A8 numerics).

The kernel dequantizes the packed weight with the LUT (`quant.dequant_lut`), turns tile
order back into [K, N] with one reshape/transpose (a tile is a strided block, so no index
gather) and runs one fp32 matmul. On the NPU the dequantized tiles would be written into
TCM in exactly the tile order and consumed by HMX; here the transpose stands in for that.

Activations:
  fp32  x as is (reference numerics);
  fp16  x rounded to fp16, products accumulated in fp32 (HMX accumulates wider than fp16);
  int8  per-row symmetric dynamic quantization, s_x = amax_row / 127, x-hat = round(x/s_x) s_x.
`error_bound` gives, per output element, a bound on |y - x @ W| (x, W unquantized fp32):
    |x| @ (S / 2)          weight rounding, S = per-element group scale
  + e_x @ |W-hat|          activation rounding, e_x = s_x / 2 (int8) or 2^-11 |x| + 2^-25 (fp16)
  + K u (|x-hat| @ |W-hat|)  fp32 accumulation, u = 2^-24 (any summation order).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mobile.npu.quant import (
    GROUPS_PER_SUPER,
    QuantizedWeight,
    dequant_lut,
    dequantize,
    pack_int4,
    scale_matrix,
)
from mobile.npu.tiles import TileShape

Activation = Literal["fp32", "fp16", "int8"]
FP32_UNIT_ROUNDOFF = 2.0**-24


def untile(flat: np.ndarray, k: int, n: int, tile: TileShape) -> np.ndarray:
    """Tile-order 1-D array -> [K, N] with reshapes and one transpose (no index gather)."""
    tk, tn = tile.tile_k, tile.tile_n
    kt, nt = k // tk, n // tn
    if tile.row_pair_interleave:
        t = flat.reshape(nt, kt, tk // 2, tn, 2).transpose(1, 2, 4, 0, 3)
    else:
        t = flat.reshape(nt, kt, tk, tn).transpose(1, 2, 0, 3)
    return t.reshape(k, n)


class TileQuantLinear:
    """A packed weight ready for `__call__(x)`; int4 stores 144-byte super-groups."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.k, self.n, self.tile, self.bits = qw.k, qw.n, qw.tile, qw.bits
        if qw.bits == 4 and qw.group_size * GROUPS_PER_SUPER == 256:
            self.packed: np.ndarray | None = pack_int4(qw)
        else:
            self.packed = None
        self._codes, self._scales, self.group_size = qw.codes, qw.scales, qw.group_size

    @property
    def weight_bytes(self) -> int:
        if self.packed is not None:
            return self.packed.nbytes
        return self._codes.nbytes + self._scales.nbytes

    def dequant_tile_order(self) -> np.ndarray:
        if self.packed is not None:
            return dequant_lut(self.packed)
        return (self._codes.astype(np.float32) * self._scales.astype(np.float32)[:, None]).ravel()

    def weight(self) -> np.ndarray:
        """W-hat [K, N] fp32."""
        return untile(self.dequant_tile_order(), self.k, self.n, self.tile)

    def __call__(self, x: np.ndarray, act: Activation = "fp16") -> np.ndarray:
        """x [M, K] float -> y [M, N] fp32."""
        xq, x_scale = quantize_activation(x, act)
        y = xq @ self.weight()
        return y if x_scale is None else y * x_scale


def quantize_activation(x: np.ndarray, act: Activation) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (x-hat or int codes as fp32 [M, K], per-row scale [M, 1] or None)."""
    x = x.astype(np.float32)
    if act == "fp32":
        return x, None
    if act == "fp16":
        return x.astype(np.float16).astype(np.float32), None
    if act == "int8":
        amax = np.abs(x).max(axis=1, keepdims=True)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        return np.clip(np.rint(x / scale), -127, 127).astype(np.float32), scale
    raise ValueError(f"unknown activation type {act}")


def gemm_ref(x: np.ndarray, qw: QuantizedWeight, act: Activation) -> np.ndarray:
    """float64 reference of the kernel's numerics: same quantized x and W-hat, exact sums."""
    xq, x_scale = quantize_activation(x, act)
    w_hat = dequantize(qw).astype(np.float64)  # via the index permutation, not `untile`
    y = xq.astype(np.float64) @ w_hat
    return y if x_scale is None else y * x_scale.astype(np.float64)


def error_bound(x: np.ndarray, qw: QuantizedWeight, act: Activation) -> np.ndarray:
    """Per-element bound [M, N] on |kernel(x) - x @ W| for the W that `qw` quantized."""
    x64 = x.astype(np.float64)
    w_hat = np.abs(dequantize(qw).astype(np.float64))
    xq, x_scale = quantize_activation(x, act)
    x_hat = xq.astype(np.float64) * (1.0 if x_scale is None else x_scale.astype(np.float64))
    if act == "fp32":
        e_x = np.zeros_like(x64)
    elif act == "fp16":
        e_x = np.abs(x64) * 2.0**-11 + 2.0**-25
    else:
        e_x = np.broadcast_to(x_scale.astype(np.float64) / 2, x64.shape)
    weight_term = np.abs(x64) @ (scale_matrix(qw).astype(np.float64) / 2)
    act_term = e_x @ w_hat
    k = x.shape[1]
    accum_term = 2 * k * FP32_UNIT_ROUNDOFF * (np.abs(x_hat) @ w_hat)
    return weight_term + act_term + accum_term
