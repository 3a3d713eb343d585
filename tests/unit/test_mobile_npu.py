"""mobile.npu: tile order, tile-group quantization, LUT dequant, tile GEMM, LUT softmax."""

import numpy as np
import pytest

from mobile.npu.direct import strips_per_chunk, tile_order_matmul
from mobile.npu.gemm import (
    TileQuantLinear,
    error_bound,
    gemm_ref,
    quantize_activation,
    untile,
)
from mobile.npu.lut_softmax import (
    EXP2_TABLE,
    lut_softmax,
    softmax_error_bound,
    softmax_ref,
)
from mobile.npu.quant import (
    dequant_arith,
    dequant_lut,
    dequant_lut16,
    dequantize,
    pack_int4,
    quantize,
    scale_matrix,
)
from mobile.npu.tiles import TileShape, from_tile_order, tile_permutation, to_tile_order

HMX = TileShape(32, 32, True)
TILES = [HMX, TileShape(16, 16, True), TileShape(64, 32, False), TileShape(32, 1, False)]


def _weights(seed: int, k: int = 128, n: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Heavy-ish tails and per-column spread, like real projection weights.
    return (rng.standard_t(df=4, size=(k, n)) * rng.uniform(0.01, 0.1, size=n)).astype(np.float32)


@pytest.mark.parametrize("tile", TILES)
def test_tile_order_round_trips_and_is_a_permutation(tile: TileShape) -> None:
    w = _weights(0)
    perm = tile_permutation(*w.shape, tile)
    assert np.array_equal(np.sort(perm), np.arange(w.size))
    flat = to_tile_order(w, tile)
    assert np.array_equal(from_tile_order(flat, *w.shape, tile), w)
    assert np.array_equal(untile(flat, *w.shape, tile), w)


def test_hmx_group_of_32_is_a_2x16_block() -> None:
    k, n = 64, 64
    idx = np.arange(k * n).reshape(k, n)
    group = to_tile_order(idx, HMX)[:32]
    rows, cols = np.divmod(group, n)
    assert set(rows) == {0, 1} and set(cols) == set(range(16))
    # Tile-level column-major: the second tile in memory is the next K block, same N block.
    second_tile = to_tile_order(idx, HMX)[1024:2048]
    assert set(np.divmod(second_tile, n)[0]) == set(range(32, 64))
    assert set(np.divmod(second_tile, n)[1]) == set(range(32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile", TILES)
def test_quantization_error_within_half_scale_per_element(bits: int, tile: TileShape) -> None:
    w = _weights(1 + bits)
    qw = quantize(w, tile, bits=bits, group_size=32)
    err = np.abs(dequantize(qw) - w)
    assert np.all(err <= scale_matrix(qw) / 2 * (1 + 1e-6))
    qmax = 7 if bits == 4 else 127
    assert np.abs(qw.codes).max() <= qmax


def test_int4_pack_is_144_bytes_per_256_weights() -> None:
    qw = quantize(_weights(2), HMX, bits=4)
    packed = pack_int4(qw)
    assert packed.shape == (qw.k * qw.n // 256, 144)
    assert packed.nbytes == qw.packed_bytes


@pytest.mark.parametrize("seed", [3, 4])
def test_lut_dequant_equals_arithmetic_bit_for_bit(seed: int) -> None:
    qw = quantize(_weights(seed), HMX, bits=4)
    packed = pack_int4(qw)
    ref = dequant_arith(packed)
    assert np.array_equal(dequant_lut(packed).view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(dequant_lut16(packed).view(np.uint32), ref.view(np.uint32))
    # And the packed path reproduces the unpacked quantization exactly.
    assert np.array_equal(untile(ref, qw.k, qw.n, HMX), dequantize(qw))


@pytest.mark.parametrize("act", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile", [HMX, TileShape(32, 1, False)])
def test_tile_gemm_matches_reference_and_error_bound_per_row(act, bits, tile) -> None:
    rng = np.random.default_rng(10 + bits)
    w = _weights(5 + bits, k=256, n=128)
    x = rng.standard_normal((16, 256)).astype(np.float32) * rng.uniform(0.1, 10, size=(16, 1))
    qw = quantize(w, tile, bits=bits)
    lin = TileQuantLinear(qw)
    y = lin(x, act=act).astype(np.float64)
    # Kernel vs float64 reference of the same numerics: fp32 accumulation only.
    ref = gemm_ref(x, qw, act)
    accum = 2 * 256 * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(dequantize(qw)))
    if act == "int8":
        accum = accum * 1.01 + 2 * 256 * 2.0**-24 * np.abs(ref)
    assert np.all(np.abs(y - ref) <= accum + 1e-30)
    # Kernel vs the unquantized fp32 product: the stated per-element bound, checked per row.
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bound = error_bound(x, qw, act)
    ratio_per_row = (np.abs(y - exact) / bound).max(axis=1)
    assert np.all(ratio_per_row <= 1.0), ratio_per_row
    # The bound is not vacuous: quantization error is a visible part of it.
    assert ratio_per_row.max() > 0.02


def test_exp2_table_is_exact_fp16_rounding_with_inf_and_zero() -> None:
    mags = np.arange(0x8000, dtype=np.uint16).view(np.float16).astype(np.float64)
    finite = np.isfinite(mags)
    assert EXP2_TABLE[0] == 1.0
    assert EXP2_TABLE[0x7C00] == 0.0  # -inf -> 0
    rel = np.abs(EXP2_TABLE[finite].astype(np.float64) - np.exp2(-mags[finite]))
    tol = np.maximum(np.exp2(-mags[finite]) * 2.0**-11, 2.0**-25)
    assert np.all(rel <= tol)
    assert np.all(np.diff(EXP2_TABLE[finite].astype(np.float64)) <= 0)  # monotone in |d|


@pytest.mark.parametrize("scale", [0.5, 4.0, 30.0])
def test_lut_softmax_within_stated_bound_per_row(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 10))
    scores = (rng.standard_normal((64, 513)) * scale).astype(np.float32)
    got = lut_softmax(scores).astype(np.float64)
    ref = softmax_ref(scores)
    bound = softmax_error_bound(scores)
    ratio_per_row = (np.abs(got - ref) / bound).max(axis=1)
    assert np.all(ratio_per_row <= 1.0), ratio_per_row.max()
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # fp16 rounding of d is visible: the LUT is not secretly an fp64 exp.
    assert np.abs(got - ref).max() > 1e-7


@pytest.mark.parametrize("chunk_bytes", [1, 40_000, 1 << 30])  # 1 strip, a few, all at once
@pytest.mark.parametrize("act", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile", TILES)
def test_tile_order_gemm_matches_reference_and_error_bound_per_row(tile, bits, act,
                                                                   chunk_bytes) -> None:
    rng = np.random.default_rng(20 + bits)
    k, n = 256, 128
    w = _weights(7 + bits, k=k, n=n)
    x = rng.standard_normal((5, k)).astype(np.float32) * rng.uniform(0.1, 10, size=(5, 1))
    qw = quantize(w, tile, bits=bits)
    lin = TileQuantLinear(qw)
    y = tile_order_matmul(lin, x, act=act, chunk_bytes=chunk_bytes).astype(np.float64)
    xq, x_scale = quantize_activation(x, act)
    # vs the float64 reference of the same numerics: fp32 accumulation only, per element.
    ref = gemm_ref(x, qw, act)
    x_hat = np.abs(xq.astype(np.float64)) * (1.0 if x_scale is None else x_scale)
    accum = 2 * k * 2.0**-24 * (x_hat @ np.abs(dequantize(qw).astype(np.float64)))
    if act == "int8":  # plus the final rounding of y * s_x
        accum = accum * 1.01 + 2.0**-24 * np.abs(ref)
    ratio = (np.abs(y - ref) / (accum + 1e-30)).max(axis=1)
    assert np.all(ratio <= 1.0), ratio
    # vs the untiling kernel: the same bound (both are fp32 sums of the same products).
    assert np.all(np.abs(y - lin(x, act=act)) <= 2 * accum + 1e-30)
    # vs the unquantized product: the stated per-element bound, per row, and not vacuous.
    exact = x.astype(np.float64) @ w.astype(np.float64)
    per_row = (np.abs(y - exact) / error_bound(x, qw, act)).max(axis=1)
    assert np.all(per_row <= 1.0) and per_row.max() > 0.02, per_row


def test_tile_order_gemm_fails_the_bound_when_the_layout_is_misread() -> None:
    # Negative control: the same packed bytes read as if there were no row-pair interleave
    # put weights on the wrong rows; the per-row check above must catch that.
    w = _weights(11, k=256, n=128)
    x = np.random.default_rng(12).standard_normal((4, 256)).astype(np.float32)
    qw = quantize(w, HMX, bits=4)
    misread = TileQuantLinear(qw)
    misread.tile = TileShape(32, 32, False)
    y = tile_order_matmul(misread, x, act="fp32").astype(np.float64)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert np.all((np.abs(y - exact) / error_bound(x, qw, "fp32")).max(axis=1) > 1.0)


def test_strips_per_chunk_takes_whole_strips_within_the_budget() -> None:
    lin = TileQuantLinear(quantize(_weights(13, k=256, n=128), HMX, bits=4))
    assert strips_per_chunk(lin, 1) == 1  # a strip is 256 x 32 x 4 B = 32 KiB
    assert strips_per_chunk(lin, 100_000) == 3
    assert strips_per_chunk(lin, 1 << 30) == 4  # never more than the matrix has
