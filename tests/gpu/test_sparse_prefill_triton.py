"""Triton sparse-prefill kernel against the torch reference, on the GPU (skipped without CUDA).

Fresh random inputs per test (the seed is printed on failure); the output is poisoned with
NaN first, so a row the kernel forgets to write fails the test.
"""

import dataclasses
import math

import pytest
import torch

from attention_backends.kernels import sparse_prefill, sparse_prefill_ref
from attention_backends.kernels.paged_inputs import make_paged_prefill_batch
from attention_backends.patterns import DensePattern, TrianglePattern

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SMALL_TRIANGLE = TrianglePattern(sink_tokens=4, window_tokens=40, last_q_tokens=24, block_size=16)
PAPER_TRIANGLE = TrianglePattern()
DTYPES = [torch.bfloat16, torch.float16]
TOLERANCE = 1e-2  # relative L2 error; bf16/fp16 operands land in 1e-3..1e-2


def check_against_reference(seq_lens, dtype, *, query_lens=None, prompt_lens=None, q_heads=8,
                            kv_heads=2, head_dim=128, block_size=16, pattern=SMALL_TRIANGLE,
                            config=None, query_scale=1.0):  # fmt: skip
    seed = torch.seed() % 2**31
    generator = torch.Generator().manual_seed(seed)
    batch = make_paged_prefill_batch(
        seq_lens, query_lens, prompt_lens, q_heads, kv_heads, head_dim, block_size,
        dtype=dtype, device="cuda", generator=generator,
    )  # fmt: skip
    batch.query.mul_(query_scale)
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_table,
            batch.query_start_loc, batch.seq_lens, batch.prompt_lens, pattern,
            1 / math.sqrt(head_dim))  # fmt: skip
    expected = sparse_prefill_ref(*args).float()  # fp32 compute on the GPU
    out = torch.full_like(batch.query, float("nan"))
    sparse_prefill(*args, out=out, config=config)  # config=None: the kernel's own choice
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), f"unwritten or NaN rows (seed {seed})"
    error = ((out.float() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE, f"relative error {error:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len", [1, 45, 200, 333])
def test_lengths_not_multiple_of_block(seq_len, dtype):
    check_against_reference([seq_len], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (16, 4), (32, 4), (6, 2)])
def test_gqa_ratios(q_heads, kv_heads, dtype):
    check_against_reference([190, 77], dtype, q_heads=q_heads, kv_heads=kv_heads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_sequences(dtype):
    check_against_reference([5, 300, 129, 64, 250], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_non_final_and_final_chunks(dtype):
    check_against_reference(
        [260, 180, 90], dtype, query_lens=[70, 180, 31], prompt_lens=[270, 180, 90]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_pattern(dtype):
    check_against_reference([150, 300], dtype, pattern=DensePattern())


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dim_64_and_big_cache_blocks(dtype):
    check_against_reference([300, 100], dtype, head_dim=64, block_size=128)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_paper_pattern_with_kv_splits(dtype, block_size):
    # 3000 keys: the last-rows kernel splits the KV and merges the splits; cache blocks
    # smaller than a key tile (per-key lookup) and equal to it (one lookup per tile)
    check_against_reference(
        [3000, 1100], dtype, q_heads=32, kv_heads=8, pattern=PAPER_TRIANGLE, block_size=block_size
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_last_rows_without_splits(dtype):
    from attention_backends.kernels.sparse_prefill_triton import LaunchConfig

    check_against_reference(
        [1500], dtype, q_heads=32, kv_heads=8, pattern=PAPER_TRIANGLE,
        config=LaunchConfig(target_programs=1),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_separate_masked_and_unmasked_loops(dtype):
    from attention_backends.kernels.sparse_prefill_triton import LaunchConfig

    check_against_reference(
        [3000, 700], dtype, q_heads=32, kv_heads=8, pattern=PAPER_TRIANGLE,
        config=LaunchConfig(single_loop=False, last_single_loop=False),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", [PAPER_TRIANGLE, DensePattern()], ids=["triangle", "dense"])
def test_peaked_scores_exercise_the_lazy_rescale(dtype, pattern):
    # large logits: row maxima jump by far more than 2^8 between tiles
    check_against_reference([2100], dtype, q_heads=32, kv_heads=8, pattern=pattern, query_scale=8.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("kv_tma", [True, False], ids=["tma", "gather"])
def test_tma_and_gathered_key_tiles(dtype, block_size, kv_tma):
    # cache blocks a multiple of the key tile: TMA boxes (or the one-lookup gather), with
    # a non-final chunk and a cached prefix so tiles start mid-block
    from attention_backends.kernels.sparse_prefill_triton import LaunchConfig

    check_against_reference(
        [3000, 700, 1300], dtype, query_lens=[3000, 700, 500], prompt_lens=[3000, 900, 1300],
        q_heads=32, kv_heads=8, pattern=PAPER_TRIANGLE, block_size=block_size,
        config=LaunchConfig(kv_tma=kv_tma),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_n", [32, 64])
def test_tma_tiles_narrower_than_the_cache_block(dtype, block_n):
    # 32-key TMA boxes in 64-key cache blocks (two boxes per block), chunked prefill
    from attention_backends.kernels.sparse_prefill_triton import TMA_CONFIG

    check_against_reference(
        [2500, 700], dtype, query_lens=[2500, 300], prompt_lens=[2500, 1000], q_heads=32,
        kv_heads=8, pattern=PAPER_TRIANGLE, block_size=64,
        config=dataclasses.replace(TMA_CONFIG, block_n=block_n),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overlap", [True, False], ids=["side-stream", "serial"])
def test_last_rows_on_a_side_stream_or_serial(dtype, overlap):
    # the last rows overlapped with the streaming rows (side stream) or after them
    from attention_backends.kernels.sparse_prefill_triton import TMA_CONFIG

    check_against_reference(
        [4000, 900], dtype, query_lens=[4000, 500], prompt_lens=[4000, 1200], q_heads=32,
        kv_heads=8, pattern=PAPER_TRIANGLE, block_size=64,
        config=dataclasses.replace(TMA_CONFIG, overlap_last_rows=overlap),
    )  # fmt: skip


GLUON_CONFIGS = {  # (block_m, num_warps, num_stages): 64 rows per warpgroup either way
    "128x64-w8-s3": (128, 8, 3),
    "128x64-w8-s2": (128, 8, 2),
    "64x64-w4-s2": (64, 4, 2),
    "64x64-w4-s3": (64, 4, 3),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GLUON_CONFIGS.values(), ids=GLUON_CONFIGS.keys())
@pytest.mark.parametrize("q_heads,head_dim", [(32, 128), (64, 128), (32, 64)],
                         ids=["gqa4", "gqa8", "d64"])  # fmt: skip
def test_gluon_streaming_rows(dtype, shape, q_heads, head_dim):
    # the Hopper Gluon kernel for the streaming rows: ragged, chunked and cached-prefix
    # sequences, sinks present and absent (a sequence shorter than the window)
    from attention_backends.kernels.sparse_prefill_triton import TMA_CONFIG

    block_m, num_warps, num_stages = shape
    config = dataclasses.replace(
        TMA_CONFIG, streaming_kernel="gluon", block_m=block_m, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    check_against_reference(
        [3000, 700, 1333, 300], dtype, query_lens=[3000, 300, 611, 300],
        prompt_lens=[3000, 1000, 1333, 300], q_heads=q_heads, kv_heads=8, head_dim=head_dim,
        pattern=PAPER_TRIANGLE, block_size=64, config=config,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_gluon_streaming_rows_small_window_and_big_blocks(dtype):
    # a window of a few tiles and 16 sinks in 128-token cache blocks
    from attention_backends.kernels.sparse_prefill_triton import TMA_CONFIG

    pattern = TrianglePattern(sink_tokens=16, window_tokens=100, last_q_tokens=24)
    config = dataclasses.replace(TMA_CONFIG, streaming_kernel="gluon", num_warps=8)
    check_against_reference(
        [900, 257], dtype, query_lens=[900, 129], q_heads=32, kv_heads=8, pattern=pattern,
        block_size=128, config=config,
    )  # fmt: skip


@pytest.mark.parametrize("overlap", [True, False], ids=["side-stream", "one-stream"])
@pytest.mark.parametrize("streaming", ["auto", "triton"])
def test_serving_overrides_of_the_launch_config(overlap, streaming):
    """The settings' overrides (TESSERA_ATTENTION_KERNEL_*) compute the same function."""
    from attention_backends.kernels.sparse_prefill_triton import GLUON_CONFIG, with_overrides

    config = with_overrides(GLUON_CONFIG, overlap, streaming)
    check_against_reference([1500, 700], torch.bfloat16, block_size=64, pattern=PAPER_TRIANGLE,
                            q_heads=32, kv_heads=8, config=config)
