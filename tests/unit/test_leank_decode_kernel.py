"""Paged pruned decode: torch reference vs the zeroed-channel definition, and the Triton
kernel vs the reference (TRITON_INTERPRET=1 on CPU; natively with @gpu on the device)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kv_manager.leank.apply import masked_dense_attention, pruned_value_sum
from kv_manager.leank.kernels.decode_ref import paged_pruned_decode_ref, write_pruned_tokens
from kv_manager.leank.layout import LayerLayout


def _paged_case(
    seq_lens: list[int],
    counts: list[int],
    q_heads: int,
    block_size: int,
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Random ragged batch written through the real cache write into shuffled pages."""
    generator = torch.Generator().manual_seed(seed)
    kv_heads, head_dim = len(counts), 64
    keep = torch.zeros(kv_heads, head_dim, dtype=torch.bool)
    for head, count in enumerate(counts):
        keep[head, torch.randperm(head_dim, generator=generator)[:count]] = True
    layout = LayerLayout(keep)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    page_order = torch.randperm(num_blocks, generator=generator)
    k_cache = torch.full(
        (num_blocks, block_size, max(layout.k_width, 1)), float("nan"), dtype=dtype
    )
    v_cache = torch.full(
        (num_blocks, block_size, len(layout.live_heads), head_dim), float("nan"), dtype=dtype
    )
    block_table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    value_sum = torch.zeros(len(seq_lens), len(layout.pruned_heads), head_dim)
    dense, used = [], 0
    for seq, n in enumerate(seq_lens):
        pages = page_order[used : used + blocks_per_seq[seq]]
        used += blocks_per_seq[seq]
        block_table[seq, : len(pages)] = pages.to(torch.int32)
        keys = torch.randn(n, kv_heads, head_dim, generator=generator) * 2
        values = torch.randn(n, kv_heads, head_dim, generator=generator)
        positions = torch.arange(n)
        slots = pages[positions // block_size] * block_size + positions % block_size
        write_pruned_tokens(keys, values, slots, k_cache, v_cache, layout)
        value_sum[seq] = pruned_value_sum(values.to(dtype), layout)
        dense.append((keys.to(dtype), values.to(dtype)))
    query = torch.randn(len(seq_lens), q_heads, head_dim, generator=generator).to(dtype)
    tensors = [
        t.to(device)
        for t in (
            query,
            k_cache,
            v_cache,
            value_sum,
            block_table,
            torch.tensor(seq_lens, dtype=torch.int32),
        )
    ]
    return tensors, layout, dense


def _assert_rows_close(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    # Per (sequence, head) row: a wrong row cannot hide behind a good global max.
    row_error = (got.float().cpu() - expected.float().cpu()).abs().amax(dim=-1)
    bound = atol + rtol * expected.float().cpu().abs().amax(dim=-1)
    bad = torch.nonzero(row_error > bound).tolist()
    assert not bad, f"rows {bad[:5]}: error {row_error.max():.3e}"


CASES = [
    ([1, 17, 64, 200], [16, 32, 48], 9, 16),
    ([33, 5], [0, 16, 64], 9, 16),
    ([130, 64, 1], [0, 0, 32], 6, 32),
]
# v3's tiling: 64-token tiles spanning 4 pages and ending mid-page, a sequence shorter than
# one tile next to one of several splits (so its later splits lie past its end), a fully
# pruned head, and kept counts aligned only to 8 and to 1 (KEPT_ALIGN 8 and 1).
TILING_CASES = [
    ([300, 7, 129], [64, 0, 16, 48], 8, 16),
    ([90, 250], [8, 24, 0], 6, 16),
    ([77, 3], [5, 12], 4, 16),
]
# (block_n, tokens_per_split): v2's small tiles, 64-token tiles with one tile per split,
# and the device-sized default.
TILINGS = [(16, 32), (16, 512), (64, 64), (64, None)]


@pytest.mark.parametrize("seq_lens,counts,q_heads,block_size", CASES)
def test_paged_reference_matches_zeroed_channel_dense(seq_lens, counts, q_heads, block_size):
    tensors, layout, dense = _paged_case(seq_lens, counts, q_heads, block_size, seed=3)
    got = paged_pruned_decode_ref(*tensors, layout)
    for seq, (keys, values) in enumerate(dense):
        expected = masked_dense_attention(
            tensors[0][seq : seq + 1], keys, values, layout.keep, causal=True
        )[0]
        _assert_rows_close(got[seq], expected, rtol=1e-5, atol=1e-5)


def _triton_kernel(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("triton")
    from kv_manager.leank.kernels.decode_triton import paged_pruned_decode

    return paged_pruned_decode


def check_interpreted_kernel() -> None:
    """Kernel vs reference on every case and tiling; run in a fresh interpreter with
    TRITON_INTERPRET=1 (Triton fixes the mode when it is first imported, and other tests
    may import it first)."""
    from kv_manager.leank.kernels.decode_triton import paged_pruned_decode

    for case_index, (seq_lens, counts, q_heads, block_size) in enumerate(CASES + TILING_CASES):
        for tiling_index, (block_n, tokens_per_split) in enumerate(TILINGS):
            seed = 11 + 10 * case_index + tiling_index
            tensors, layout, _ = _paged_case(seq_lens, counts, q_heads, block_size, seed=seed)
            expected = paged_pruned_decode_ref(*tensors, layout)
            got = paged_pruned_decode(
                *tensors, layout, block_n=block_n, tokens_per_split=tokens_per_split
            )
            _assert_rows_close(got, expected, rtol=1e-5, atol=1e-5)
            # vLLM's page: one row per token, [K kept | V live | padding], read as views.
            query, k_cache, v_cache, *rest = tensors
            rows = torch.cat(
                [
                    k_cache[..., : layout.k_width],
                    v_cache.flatten(2),
                    torch.full_like(k_cache[..., :5], float("nan")),
                ],
                dim=-1,
            )
            k_view = rows[..., : layout.k_width]
            v_view = rows[..., layout.k_width : rows.shape[-1] - 5].unflatten(-1, v_cache.shape[2:])
            got = paged_pruned_decode(
                query,
                k_view,
                v_view,
                *rest,
                layout,
                block_n=block_n,
                tokens_per_split=tokens_per_split,
                max_seq_len=max(seq_lens),
            )
            _assert_rows_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kept_alignment_is_the_largest_dividing_power_of_two():
    from kv_manager.leank.kernels.decode_triton import kept_alignment

    assert kept_alignment([32, 0, 64, 48]) == 16
    assert kept_alignment([8, 24, 0]) == 8
    assert kept_alignment([5, 12]) == 1
    assert kept_alignment([0, 0]) == 16
    assert kept_alignment([128, 256], cap=16) == 16


def test_default_split_fills_the_device_but_keeps_tiles_per_program():
    from kv_manager.leank.kernels.decode_triton import default_tokens_per_split

    cpu = torch.device("cpu")  # counted as 4 SMs: 32 programs wanted
    # 1 x 8 x 32K tokens: 4 splits would be 128 tiles each; the cap of 64 tiles gives 8.
    assert default_tokens_per_split(1, 8, 32768, 64, cpu) == 4096
    # A sequence shorter than 4 tiles gets one split.
    assert default_tokens_per_split(1, 8, 100, 64, cpu) == 128
    # 1 x 2 x 5,000 tokens: 16 splits wanted, each >= 4 tiles: 16 splits of 320 tokens.
    tokens = default_tokens_per_split(1, 2, 5000, 64, cpu)
    assert tokens == 320 and -(-5000 // tokens) == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="covered natively by the gpu test")
def test_triton_kernel_matches_reference_interpreted():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.unit.test_leank_decode_kernel import "
            "check_interpreted_kernel as check; check()",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_matches_reference_on_gpu(dtype, monkeypatch):
    kernel = _triton_kernel(monkeypatch)
    long_case = ([4096, 777, 9000, 1], [16, 0, 48, 32, 16, 64, 0, 16], 32, 16)
    for seed, (seq_lens, counts, q_heads, block_size) in enumerate(
        CASES + TILING_CASES + [long_case]
    ):
        tensors, layout, _ = _paged_case(
            seq_lens, counts, q_heads, block_size, seed=seed, device="cuda", dtype=dtype
        )
        expected = paged_pruned_decode_ref(*[t.cpu() for t in tensors], layout)
        # The launch configs the timing sweep tries, each compiled for real on the device.
        for block_n, tokens_per_split, num_stages in (
            (64, None, 3),
            (64, 256, 4),
            (128, 4096, 3),
            (32, 256, 4),
            (16, 4096, 3),
        ):
            got = kernel(
                *tensors,
                layout,
                block_n=block_n,
                tokens_per_split=tokens_per_split,
                num_stages=num_stages,
            )
            _assert_rows_close(got, expected, rtol=2e-2, atol=2e-2)
