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
# The 64-token tiling: tiles spanning 4 pages and ending mid-page, a sequence shorter than
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


def _nan_out(query: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # A row the kernel forgets to write stays NaN and fails the bound.
    return torch.full(query.shape, float("nan"), dtype=dtype, device=query.device)


def _packed_row_views(k_cache, v_cache, layout):
    """vLLM's page: one row per token, [K kept | V live | padding], read as views."""
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
    return k_view, v_view


def _check_v4_case(tensors, layout, expected, block_n, tokens_per_split, bound, **launch):
    """v4 twice on the same inputs (the second call finds the counters the first left),
    then through vLLM's packed-row views with ``max_seq_len``, then on the batch without
    its last sequence (another grid, same cached workspace)."""
    from kv_manager.leank.kernels.decode_triton import paged_pruned_decode

    query, k_cache, v_cache, value_sum, block_table, seq_lens = tensors
    tiling = {"block_n": block_n, "tokens_per_split": tokens_per_split, **launch}
    for _ in range(2):
        got = paged_pruned_decode(*tensors, layout, out=_nan_out(query), **tiling)
        _assert_rows_close(got, expected, *bound)
    k_view, v_view = _packed_row_views(k_cache, v_cache, layout)
    got = paged_pruned_decode(
        query, k_view, v_view, value_sum, block_table, seq_lens, layout,
        max_seq_len=int(seq_lens.max()), out=_nan_out(query), **tiling,
    )  # fmt: skip
    _assert_rows_close(got, expected, *bound)
    if len(seq_lens) > 1:
        fewer = [t[:-1] for t in (query, value_sum, block_table, seq_lens)]
        got = paged_pruned_decode(
            fewer[0], k_cache, v_cache, *fewer[1:], layout, out=_nan_out(fewer[0]), **tiling
        )
        _assert_rows_close(got, expected[:-1], *bound)


def _assert_counters_zero() -> None:
    from kv_manager.leank.kernels.decode_triton import _WORKSPACES

    assert _WORKSPACES, "no workspace was used"
    for workspace in _WORKSPACES.values():
        assert not workspace.tickets.any(), "a merge counter was left non-zero"


def check_interpreted_kernel() -> None:
    """v4 vs the reference on every case and tiling; run in a fresh interpreter with
    TRITON_INTERPRET=1 (Triton fixes the mode when it is first imported, and other tests
    may import it first)."""
    for case_index, (seq_lens, counts, q_heads, block_size) in enumerate(CASES + TILING_CASES):
        for tiling_index, (block_n, tokens_per_split) in enumerate(TILINGS):
            seed = 11 + 10 * case_index + tiling_index
            tensors, layout, _ = _paged_case(seq_lens, counts, q_heads, block_size, seed=seed)
            expected = paged_pruned_decode_ref(*tensors, layout)
            _check_v4_case(tensors, layout, expected, block_n, tokens_per_split, (1e-5, 1e-5))
    # Half precision, as served: fp16 and bf16 caches and queries, float32 reference on
    # the same rounded values.
    for dtype in (torch.float16, torch.bfloat16):
        for case_index, (seq_lens, counts, q_heads, block_size) in enumerate(TILING_CASES):
            tensors, layout, _ = _paged_case(
                seq_lens, counts, q_heads, block_size, seed=200 + case_index, dtype=dtype
            )
            expected = paged_pruned_decode_ref(*[t.float() for t in tensors[:4]],
                                               *tensors[4:], layout)  # fmt: skip
            _check_v4_case(tensors, layout, expected, 16, 32, (1e-2, 1e-2))
    _assert_counters_zero()


def check_interpreted_workspace() -> None:
    """A caller's own workspace and an fp16 output; a workspace too small is refused."""
    from kv_manager.leank.kernels.decode_triton import DecodeWorkspace, paged_pruned_decode

    tensors, layout, _ = _paged_case([300, 7, 129], [64, 0, 16, 48], 8, 16, seed=5)
    expected = paged_pruned_decode_ref(*tensors, layout)
    # 3 sequences x 8 heads x 10 splits of 32 tokens = 240 rows.
    workspace = DecodeWorkspace.create(240, 64, torch.device("cpu"))
    for _ in range(2):
        got = paged_pruned_decode(
            *tensors, layout, block_n=16, tokens_per_split=32, workspace=workspace,
            out=_nan_out(tensors[0], torch.float16),
        )  # fmt: skip
        assert got.dtype == torch.float16
        _assert_rows_close(got, expected, rtol=2e-3, atol=2e-3)
        assert not workspace.tickets.any()
    # A max_seq_len below the longest sequence (a caller's bug) cuts that sequence short
    # but must not leave a counter behind to break the next call.
    paged_pruned_decode(*tensors, layout, block_n=16, tokens_per_split=32, max_seq_len=100,
                        workspace=workspace)  # fmt: skip
    assert not workspace.tickets.any()
    got = paged_pruned_decode(*tensors, layout, block_n=16, tokens_per_split=32,
                              workspace=workspace, out=_nan_out(tensors[0]))  # fmt: skip
    _assert_rows_close(got, expected, rtol=1e-5, atol=1e-5)
    small = DecodeWorkspace.create(239, 64, torch.device("cpu"))
    try:
        paged_pruned_decode(*tensors, layout, block_n=16, tokens_per_split=32, workspace=small)
    except ValueError as error:
        assert "240" in str(error)
    else:
        raise AssertionError("a workspace of 239 rows was accepted for 240")


def test_kept_alignment_is_the_largest_dividing_power_of_two():
    from kv_manager.leank.kernels.decode_triton import kept_alignment

    assert kept_alignment([32, 0, 64, 48]) == 16
    assert kept_alignment([8, 24, 0]) == 8
    assert kept_alignment([5, 12]) == 1
    assert kept_alignment([0, 0]) == 16
    assert kept_alignment([128, 256], cap=16) == 16


def test_default_split_is_one_wave_of_long_programs():
    from kv_manager.leank.kernels.decode_triton import default_tokens_per_split

    cpu = torch.device("cpu")  # counted as 4 SMs: 16 programs resident
    # 1 x 8 x 32K tokens: 2 splits fit the wave, but the cap of 64 tiles asks for 8.
    assert default_tokens_per_split(1, 8, 32768, 64, cpu) == 4096
    # A sequence shorter than 4 tiles gets one split.
    assert default_tokens_per_split(1, 8, 100, 64, cpu) == 128
    # 1 x 2 x 5,000 tokens: 8 splits fill the 16 slots; 10 tiles each.
    tokens = default_tokens_per_split(1, 2, 5000, 64, cpu)
    assert tokens == 640 and -(-5000 // tokens) == 8
    # The H200 (132 SMs, 528 resident programs) at the benchmark's shapes (8 KV heads):
    # batch 1 -> 64 splits (512 programs, one wave), batch 8 -> 8 (512), batch 32 -> the
    # 64-tile cap.
    h200 = {
        (batch, context): default_tokens_per_split(
            batch, 8, context, 64, cpu, multiprocessors=132
        )  # fmt: skip
        for batch in (1, 8, 32)
        for context in (32768, 131072)
    }
    assert h200 == {
        (1, 32768): 512, (1, 131072): 2048, (8, 32768): 4096, (8, 131072): 4096,
        (32, 32768): 4096, (32, 131072): 4096,
    }  # fmt: skip
    for (batch, context), tokens in h200.items():
        assert batch * 8 * -(-context // tokens) <= 528 or tokens == 64 * 64


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
            "check_interpreted_kernel as a, check_interpreted_workspace as b; a(); b()",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_matches_reference_on_gpu(dtype):
    """v4 (twice per config: the counters reset; then a smaller batch on the same
    workspace; packed-row views), natively, for every launch config the timing sweep
    tries; the split merge's atomics and memory ordering run for real here."""
    pytest.importorskip("triton")
    long_case = ([4096, 777, 9000, 1], [16, 0, 48, 32, 16, 64, 0, 16], 32, 16)
    for seed, (seq_lens, counts, q_heads, block_size) in enumerate(
        CASES + TILING_CASES + [long_case]
    ):
        tensors, layout, _ = _paged_case(
            seq_lens, counts, q_heads, block_size, seed=seed, device="cuda", dtype=dtype
        )
        expected = paged_pruned_decode_ref(*[t.cpu() for t in tensors], layout)
        for block_n, tokens_per_split, num_stages in (
            (64, None, 3),
            (64, 256, 3),
            (64, 512, 3),
            (64, 1024, 3),
            (64, 256, 4),
            (128, 4096, 3),
            (32, 256, 4),
            (16, 4096, 3),
        ):
            _check_v4_case(
                tensors, layout, expected, block_n, tokens_per_split, (2e-2, 2e-2),
                num_stages=num_stages,
            )  # fmt: skip
    torch.cuda.synchronize()
    _assert_counters_zero()
