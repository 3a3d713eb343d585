"""Cases for the per-head Triton kernel against the torch reference. Not collected by
default (no ``test_`` prefix): ``test_head_sparse_triton_interpret.py`` runs them in a child
pytest with ``TRITON_INTERPRET=1`` on CPU; on a GPU run them directly (compiled).

Fresh random paged batches: ragged lengths, GQA, chunked prefill, cache blocks smaller and
larger than the tile; every pattern in one layer; per-row error bound.
"""

import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from attention_backends.kernels.head_sparse_plan import make_plan  # noqa: E402
from attention_backends.kernels.head_sparse_plan_triton import make_plan_device  # noqa: E402
from attention_backends.kernels.head_sparse_triton import (  # noqa: E402
    HeadSparseLaunch,
    head_sparse_prefill_triton,
)
from attention_backends.kernels.paged_inputs import make_paged_prefill_batch  # noqa: E402
from attention_backends.kernels.vertical_slash_estimate_triton import (  # noqa: E402
    last_rows_scores_triton,
)
from attention_backends.patterns.minference import SequenceChunk  # noqa: E402
from attention_backends.patterns.minference.vertical_slash import (  # noqa: E402
    last_rows_attention,
    slash_scores,
)
from tests.unit.head_sparse_same_index import (  # noqa: E402
    index_differences,
    recorded_indexes,
    reference_on_indexes,
)
from tests.unit.test_head_sparse_ref import mixed_heads, worst_row_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(seq_lens, query_lens=None, prompt_lens=None, q_heads=6, kv_heads=2, block_size=16,
             head_dim=16, dtype=torch.float32, launch=None, tile=16):
    seed = torch.seed() % 2**31
    generator = torch.Generator().manual_seed(seed)
    batch = make_paged_prefill_batch(seq_lens, query_lens, prompt_lens, q_heads, kv_heads,
                                     head_dim, block_size, dtype=dtype, device=DEVICE,
                                     generator=generator)
    layer = replace(mixed_heads(q_heads), block_size=tile)
    scale = 1 / math.sqrt(head_dim)
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_table,
            batch.query_start_loc, batch.seq_lens, batch.prompt_lens, layer, scale)
    out = torch.full_like(batch.query, float("nan"))
    # compiled, the Triton estimate may split a top-k tie unlike the reference's
    # (head_sparse_same_index): compare on the index this path estimated
    with recorded_indexes() as indexes:
        head_sparse_prefill_triton(*args, out=out, launch=launch or HeadSparseLaunch())
    assert not torch.isnan(out).any(), f"rows not written (seed {seed})"
    # the same torch estimator on CPU: the same index; compiled, at most a tie or two a sequence
    assert index_differences(args, indexes) <= (0 if DEVICE == "cpu" else 4 * len(indexes))
    return worst_row_error(out, reference_on_indexes(args, indexes))


@pytest.mark.parametrize("seq_lens", [[1], [13, 100], [70, 33]])
def test_ragged_lengths(seq_lens):
    assert run_case(seq_lens) < 1e-4


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (9, 3)])
def test_gqa(q_heads, kv_heads):
    assert run_case([61, 40], q_heads=q_heads, kv_heads=kv_heads) < 1e-4


def test_chunked_prefill_chunk_not_on_a_tile_boundary():
    assert run_case([70, 90], query_lens=[30, 17], prompt_lens=[75, 90]) < 1e-4


@pytest.mark.parametrize("block_size", [8, 32])
def test_cache_blocks_smaller_and_larger_than_the_tile(block_size):
    assert run_case([83], block_size=block_size) < 1e-4


# The rows pass (full rows packed in position order, MMInference's grid lines on the permuted
# layout): mixed_heads holds a grid head with horizontal lines every 13 rows, TriangleMix's
# last rows and a dense head, so both passes write rows of every kind.
ROWS_PASS = HeadSparseLaunch(separate_full_rows=True)


@pytest.mark.parametrize("seq_lens", [[13, 100], [70, 33]])
def test_rows_pass_ragged_lengths(seq_lens):
    assert run_case(seq_lens, launch=ROWS_PASS) < 1e-4


def test_rows_pass_gqa_and_chunk_not_on_a_tile_boundary():
    assert run_case([70, 90], query_lens=[30, 17], prompt_lens=[75, 90], q_heads=9, kv_heads=3,
                    launch=ROWS_PASS) < 1e-4


# 64-token tiles (the GPU's): the per-row 64-bit windows of the packed diagonal and column
# bits use all 64 bits and their third word; a 16-token tile reads 16 of them. Ragged ends
# cut the last key tile, the second chunk starts mid-tile (row 81); cache blocks of 16 take
# the per-key path, 128 the per-tile one.
@pytest.mark.parametrize("block_size", [16, 128])
def test_64_token_tiles(block_size):
    assert run_case([200, 131], query_lens=[200, 50], prompt_lens=[200, 131],
                    block_size=block_size, tile=64) < 1e-4


# The plan kernels (head_sparse_plan_triton) against make_plan, list for list: whole
# sequences and a chunk's query tiles; steps of 4 tiles/columns cross step boundaries.
@pytest.mark.parametrize("num_tokens,first_tile,block", [(61, 0, 256), (300, 0, 4),
                                                          (300, 7, 4), (300, 18, 8)])
def test_device_plan_matches_make_plan(num_tokens, first_tile, block):
    generator = torch.Generator().manual_seed(num_tokens + first_tile)
    chunk = SequenceChunk(torch.randn(num_tokens, 6, 8, generator=generator).to(DEVICE),
                          torch.arange(num_tokens, device=DEVICE),
                          torch.randn(num_tokens, 2, 8, generator=generator).to(DEVICE),
                          num_tokens, 1 / math.sqrt(8))
    index = mixed_heads(6).build_index(chunk)
    num_tiles = -(-num_tokens // index.block_size)
    expected = make_plan(index, torch.arange(first_tile, num_tiles, device=DEVICE))
    actual = make_plan_device(index, first_tile, num_tiles - first_tile, block=block)
    assert int(expected.column_count.sum()) > 0  # the case has gathered columns to compare
    for name in ("tile_count", "tile_index", "column_count", "column_index"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name


def test_device_plan_end_to_end():
    assert run_case([70, 90], query_lens=[30, 90], prompt_lens=[75, 90],
                    launch=HeadSparseLaunch(device_plan=True)) < 1e-4


# The vertical-slash estimate in Triton against the torch estimator: the column and diagonal
# sums of the last rows' softmax, all heads (GQA in place) and a subset of heads (gathered
# KV heads); a chunk that ends mid-prompt, rows not a power of two, keys past one block.
# Half inputs against the torch estimator on the same (rounded) values, which it upcasts
# (the former bf16-operand dot failed the bf16 cases under the interpreter).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,rows,heads", [(150, 64, None), (97, 21, [1, 4]),
                                                    (40, 40, [5])])
def test_vertical_slash_estimate_matches_torch(num_tokens, rows, heads, dtype):
    generator = torch.Generator().manual_seed(num_tokens)
    query = torch.randn(rows, 6, 16, generator=generator, dtype=torch.float64).to(DEVICE)
    keys = torch.randn(num_tokens, 2, 16, generator=generator, dtype=torch.float64).to(DEVICE)
    query, keys = query.to(dtype), keys.to(dtype)
    positions = torch.arange(num_tokens - rows, num_tokens, device=DEVICE)
    heads = heads or list(range(6))
    chunk = SequenceChunk(query, positions, keys, num_tokens + 5, 0.25)
    probs, _ = last_rows_attention(chunk, heads, 64)
    vertical, slash = last_rows_scores_triton(query[-64:], positions[-64:], keys, heads, 0.25)
    torch.testing.assert_close(vertical, probs.sum(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slash, slash_scores(probs, positions[-64:]), rtol=1e-5,
                               atol=1e-6)


# session 2's byte-gather mask, kept for the benchmark's same-run A/B: it must still be right
def test_byte_mask_variant():
    assert run_case([70, 90], query_lens=[30, 90], prompt_lens=[75, 90], q_heads=9,
                    kv_heads=3, launch=HeadSparseLaunch(byte_mask=True)) < 1e-4
