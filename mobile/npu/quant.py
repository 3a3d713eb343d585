"""Tile-aligned group quantization (digest §2.2) and LUT dequantization (digest §2.3).

Definition. Let v = to_tile_order(W) and cut v into groups of G consecutive elements.
Group g gets one fp16 scale s_g = amax_g / qmax (rounded *up* to fp16 so no code clips),
codes c_i = round(v_i / s_g) in [-qmax, qmax], qmax = 7 (int4) or 127 (int8), and the
dequantized weight is c_i * s_g. Round-to-nearest then gives the per-element bound
    |v_i - c_i s_g| <= s_g / 2.
With 32 x 32 tiles, row-pair interleave and G = 32 a group is a 2 x 16 block of W (the
paper's layout); TileShape(G, 1, False) gives conventional groups of G along K.

Packing (int4): 8 groups form a super-group of 256 codes = 128 bytes (one 1024-bit HVX
register), followed by the 8 fp16 scales: 144 bytes per 256 weights (4.5 bits/weight),
array-of-structs so one DMA moves codes and scales together. int8 keeps one byte per code.

LUT dequant: an int4 byte holds two codes (low nibble first). HVX `vlut16` maps a nibble
through a 16-entry fp16 table; on a CPU one 256-entry table of code *pairs* does the same
job with one gather per byte. Both must equal the arithmetic unpack bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mobile.npu.tiles import TileShape, from_tile_order, to_tile_order

QMAX = {4: 7, 8: 127}
GROUPS_PER_SUPER = 8


@dataclass(frozen=True)
class QuantizedWeight:
    """A [K, N] weight quantized in tile order.

    codes: int8 [n_groups, group_size] (values in [-qmax, qmax]); scales: fp16 [n_groups].
    """

    k: int
    n: int
    tile: TileShape
    bits: int
    group_size: int
    codes: np.ndarray
    scales: np.ndarray

    @property
    def n_groups(self) -> int:
        return self.codes.shape[0]

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed form (codes + fp16 scales)."""
        return self.k * self.n * self.bits // 8 + 2 * self.n_groups


def _round_scale_up_fp16(amax: np.ndarray, qmax: int) -> np.ndarray:
    """fp16 scale s with s * qmax >= amax, so round(v / s) never needs clipping."""
    s = (amax / qmax).astype(np.float16)
    low = s.astype(np.float32) * qmax < amax
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    # All-zero groups: any positive scale works; 1.0 keeps the division finite.
    s[s == 0] = np.float16(1.0)
    return s


def quantize(
    w: np.ndarray, tile: TileShape, bits: int = 4, group_size: int = 32
) -> QuantizedWeight:
    """Quantize W [K, N] (float) into groups of `group_size` consecutive tile-order elements."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    k, n = w.shape
    if tile.elements % group_size:
        raise ValueError(f"group_size {group_size} must divide the tile's {tile.elements} elements")
    qmax = QMAX[bits]
    v = to_tile_order(w.astype(np.float32), tile).reshape(-1, group_size)
    scales = _round_scale_up_fp16(np.abs(v).max(axis=1), qmax)
    codes = np.rint(v / scales.astype(np.float32)[:, None])
    codes = np.clip(codes, -qmax, qmax).astype(np.int8)
    return QuantizedWeight(k, n, tile, bits, group_size, codes, scales)


def pack_int4(qw: QuantizedWeight) -> np.ndarray:
    """Super-group array of structs: uint8 [n_super, 144] = 128 B of nibbles + 8 fp16 scales."""
    if qw.bits != 4 or qw.group_size * GROUPS_PER_SUPER != 256:
        raise ValueError("int4 super-groups need bits=4 and group_size=32")
    if qw.n_groups % GROUPS_PER_SUPER:
        raise ValueError("number of groups must be a multiple of 8")
    nib = (qw.codes.astype(np.int16) + 8).astype(np.uint8).reshape(-1, 128, 2)
    code_bytes = nib[..., 0] | (nib[..., 1] << 4)  # [n_super, 128]
    scale_bytes = qw.scales.reshape(-1, GROUPS_PER_SUPER).view(np.uint8)  # [n_super, 16]
    return np.concatenate([code_bytes, scale_bytes], axis=1)


def unpack_codes_arith(packed: np.ndarray) -> np.ndarray:
    """Arithmetic unpack (mask, shift, subtract): int8 codes [n_super, 256]."""
    b = packed[:, :128]
    lo = (b & 0x0F).astype(np.int8) - 8
    hi = (b >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=-1).reshape(-1, 256)


def packed_scales(packed: np.ndarray) -> np.ndarray:
    """fp16 scales [n_super, 8] from a packed super-group array."""
    return np.ascontiguousarray(packed[:, 128:]).view(np.float16)


def dequant_arith(packed: np.ndarray) -> np.ndarray:
    """Reference dequant of packed int4: fp32 [n_super * 256] in tile order."""
    codes = unpack_codes_arith(packed).astype(np.float32).reshape(-1, GROUPS_PER_SUPER, 32)
    scales = packed_scales(packed).astype(np.float32)[..., None]
    return (codes * scales).reshape(-1)


# vlut16-shaped table: nibble -> fp16 value of (nibble - 8).
LUT16 = (np.arange(16, dtype=np.float32) - 8).astype(np.float16)
# CPU-shaped table: byte -> (low code, high code) as fp32, so one gather decodes two weights.
LUT256_PAIRS = np.stack(
    [LUT16[np.arange(256) & 0x0F], LUT16[np.arange(256) >> 4]], axis=1
).astype(np.float32)


def dequant_lut16(packed: np.ndarray) -> np.ndarray:
    """Dequant with the 16-entry nibble table (the HVX vlut16 formulation): fp32 tile order."""
    b = packed[:, :128]
    vals = np.stack([LUT16[b & 0x0F], LUT16[b >> 4]], axis=-1).astype(np.float32)
    scales = packed_scales(packed).astype(np.float32)[..., None]
    return (vals.reshape(-1, GROUPS_PER_SUPER, 32) * scales).reshape(-1)


# The same table with each (low, high) fp32 pair as one 8-byte word: numpy's 1-D gather of
# 8-byte items is its fast path; the [256, 2] fancy index gathered 4.7x slower (NOTES).
LUT256_PAIRS_U64 = np.ascontiguousarray(LUT256_PAIRS).view(np.uint64).reshape(256)


def dequant_lut(packed: np.ndarray) -> np.ndarray:
    """Dequant with the 256-entry pair table (one gather per byte): fp32 tile order."""
    vals = LUT256_PAIRS_U64[packed[:, :128]].view(np.float32)  # [n_super, 256]
    scales = packed_scales(packed).astype(np.float32)[..., None]
    return (vals.reshape(-1, GROUPS_PER_SUPER, 32) * scales).reshape(-1)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """Unpacked dequant back to W-hat [K, N] fp32 (codes * scale is exact in fp32)."""
    flat = (qw.codes.astype(np.float32) * qw.scales.astype(np.float32)[:, None]).reshape(-1)
    return from_tile_order(flat, qw.k, qw.n, qw.tile)


def scale_matrix(qw: QuantizedWeight) -> np.ndarray:
    """Per-element scale s_g laid back out as [K, N] fp32 (for error bounds)."""
    flat = np.repeat(qw.scales.astype(np.float32), qw.group_size)
    return from_tile_order(flat, qw.k, qw.n, qw.tile)
