"""Specification of the per-head patterns (MInference, TriangleMix as a head, MMInference's
grid): each index against its definition written element by element, the estimators against
brute force, and the chunk rules."""

import math

import pytest
import torch

from attention_backends.patterns import TrianglePattern
from attention_backends.patterns.minference import (
    AShapeHead,
    BlockSparseHead,
    DenseHead,
    HeadsIndex,
    SequenceChunk,
    TriangleHead,
    VerticalSlashHead,
)
from attention_backends.patterns.minference.vertical_slash import last_rows_attention
from attention_backends.patterns.mminference.grid import GridHead


def random_chunk(num_tokens, rows=None, q_heads=4, kv_heads=2, head_dim=16, prompt_len=None,
                 seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = num_tokens if rows is None else rows
    query = torch.randn(rows, q_heads, head_dim, generator=generator)
    keys = torch.randn(num_tokens, kv_heads, head_dim, generator=generator)
    positions = torch.arange(num_tokens - rows, num_tokens)
    return SequenceChunk(query, positions, keys, prompt_len or num_tokens, 1 / math.sqrt(head_dim))


def full_mask(index):
    return index.keep_mask(torch.arange(index.num_tokens))


def test_keep_mask_is_the_four_set_definition():
    generator = torch.Generator().manual_seed(1)
    n, size = 23, 4
    index = HeadsIndex.empty(3, n, size)
    for name in ("columns", "diagonals", "full_rows", "blocks"):
        flags = getattr(index, name)
        flags.copy_(torch.rand(flags.shape, generator=generator) < 0.15)
    mask = full_mask(index)
    for h in range(3):
        for q in range(n):
            for k in range(n):
                expected = k <= q and bool(
                    index.columns[h, k] or index.diagonals[h, q - k] or index.full_rows[h, q]
                    or index.blocks[h, q // size, k // size])
                assert bool(mask[h, q, k]) == expected, (h, q, k)


def test_triangle_head_equals_trianglemix_pattern_also_for_an_early_chunk():
    head = TriangleHead(sink_tokens=3, window_tokens=5, last_q_tokens=4)
    pattern = TrianglePattern(sink_tokens=3, window_tokens=5, last_q_tokens=4)
    for num_tokens, prompt_len in [(40, 40), (30, 33)]:
        index = head.build(random_chunk(num_tokens, prompt_len=prompt_len), [0, 1], 8)
        positions = torch.arange(num_tokens)
        expected = pattern.token_mask(positions, positions, prompt_len)
        assert torch.equal(full_mask(index)[1], expected)


def test_a_shape_is_triangle_without_last_rows():
    index = AShapeHead(sink_tokens=2, window_tokens=6).build(random_chunk(30), [0], 16)
    positions = torch.arange(30)
    expected = TrianglePattern(2, 6, 0).token_mask(positions, positions, 30)
    assert torch.equal(full_mask(index)[0], expected)


def test_dense_head_keeps_every_causal_pair():
    index = DenseHead().build(random_chunk(17), [0, 3], 4)
    assert torch.equal(full_mask(index), torch.ones(2, 17, 17, dtype=torch.bool).tril())


def brute_force_vs_scores(chunk, head, last_q):
    kv = head // chunk.group
    rows = range(chunk.query.shape[0] - last_q, chunk.query.shape[0])
    n = chunk.num_tokens
    vertical, slash = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for r in rows:
        q = int(chunk.query_positions[r])
        scores = torch.tensor([float(chunk.query[r, head].double() @ chunk.keys[k, kv].double())
                               * chunk.scale for k in range(q + 1)])
        probs = scores.softmax(0)
        for k in range(q + 1):
            vertical[k] += probs[k]
            slash[q - k] += probs[k]
    return vertical, slash


@pytest.mark.parametrize("rows", [40, 10])  # a whole prompt, and a last chunk of 10 rows
def test_vertical_slash_keeps_the_top_scored_columns_and_diagonals(rows):
    chunk = random_chunk(40, rows=rows, seed=3)
    pattern = VerticalSlashHead(vertical_size=9, slash_size=7, last_q_tokens=8, sink_tokens=2,
                                local_tokens=3)
    index = pattern.build(chunk, [0, 1, 2, 3], 16)
    for head in range(4):
        vertical, slash = brute_force_vs_scores(chunk, head, 8)
        vertical[:2], slash[:3] = math.inf, math.inf
        assert set(index.columns[head].nonzero().flatten().tolist()) == set(
            vertical.topk(9).indices.tolist())
        assert set(index.diagonals[head].nonzero().flatten().tolist()) == set(
            slash.topk(7).indices.tolist())


def test_vertical_slash_finds_a_planted_column():
    chunk = random_chunk(64, q_heads=2, kv_heads=1, seed=4)
    chunk.keys[37, 0] = chunk.query[-4:, 0].mean(0) * 4  # every last row attends key 37
    pattern = VerticalSlashHead(vertical_size=3, slash_size=4, last_q_tokens=4, sink_tokens=1,
                                local_tokens=1)
    index = pattern.build(chunk, [0], 16)
    assert index.columns[0, 37] and index.columns[0, 0] and index.diagonals[0, 0]


def test_vertical_slash_sizes_clamp_to_a_short_sequence():
    index = VerticalSlashHead(1000, 6096).build(random_chunk(50), [0, 1], 64)
    assert torch.equal(full_mask(index), torch.ones(2, 50, 50, dtype=torch.bool).tril())


def test_last_rows_attention_is_causal_inside_the_last_rows():
    chunk = random_chunk(20, seed=5)
    probs, positions = last_rows_attention(chunk, [0], 6)
    assert positions.tolist() == list(range(14, 20))
    assert probs[0, 0, 15:].abs().sum() == 0 and torch.allclose(probs.sum(-1), torch.ones(1, 6))


def test_block_sparse_keeps_top_k_pooled_blocks_with_diagonal_and_first():
    chunk = random_chunk(70, seed=6)
    size, top_k = 8, 3
    index = BlockSparseHead(top_k).build(chunk, [1], size)
    num_blocks = 9
    kv = 1 // chunk.group
    pooled_q = [chunk.query[b * size:(b + 1) * size, 1].mean(0) for b in range(num_blocks)]
    pooled_k = [chunk.keys[b * size:(b + 1) * size, kv].mean(0) for b in range(num_blocks)]
    for qb in range(num_blocks):
        kept = set(index.blocks[0, qb].nonzero().flatten().tolist())
        assert {0, qb} <= kept and len(kept) == min(top_k, qb + 1)
        others = sorted(range(1, qb), key=lambda kb: -float(pooled_q[qb] @ pooled_k[kb]))
        assert kept == {0, qb} | set(others[: top_k - len({0, qb})])


def test_block_sparse_chunk_on_block_boundaries_equals_single_shot_rows():
    whole = random_chunk(64, seed=7)
    late = SequenceChunk(whole.query[32:], whole.query_positions[32:], whole.keys, 64, whole.scale)
    pattern = BlockSparseHead(2)
    single, chunked = pattern.build(whole, [0, 2], 16), pattern.build(late, [0, 2], 16)
    assert torch.equal(single.blocks[:, 2:], chunked.blocks[:, 2:])


def test_vertical_slash_of_an_early_chunk_is_the_estimate_for_a_prompt_ending_there():
    whole = random_chunk(48, seed=8)
    pattern = VerticalSlashHead(6, 5, last_q_tokens=8, sink_tokens=1, local_tokens=2)
    early_rows = SequenceChunk(whole.query[16:32], whole.query_positions[16:32],
                               whole.keys[:32], 48, whole.scale)
    prompt_of_32 = SequenceChunk(whole.query[:32], whole.query_positions[:32], whole.keys[:32],
                                 32, whole.scale)
    a, b = pattern.build(early_rows, [0, 1], 16), pattern.build(prompt_of_32, [0, 1], 16)
    assert torch.equal(a.columns, b.columns) and torch.equal(a.diagonals, b.diagonals)


def test_grid_head_is_its_definition():
    head = GridHead(vision_start=10, vision_end=34, stride=6, phase_q=2, phase_k=4,
                    sink_tokens=2, window_tokens=3)
    mask = full_mask(head.build(random_chunk(40), [0], 8))[0]
    for q in range(40):
        for k in range(q + 1):
            on_grid = lambda p, phase: 10 <= p < 34 and (p - 10) % 6 == phase  # noqa: E731
            expected = (k < 2 or q - k < 3 or on_grid(k, 4) or on_grid(q, 2) or q >= 34)
            assert bool(mask[q, k]) == expected, (q, k)


def test_kept_and_tile_fractions_agree_with_the_mask():
    index = AShapeHead(2, 5).build(random_chunk(33), [0], 8)
    mask = full_mask(index)[0]
    assert index.kept_fraction()[0] == pytest.approx(float(mask.sum()) / (33 * 34 / 2))
    tiles = {(q // 8, k // 8) for q, k in mask.nonzero().tolist()}
    assert index.causal_tile_fraction(8)[0] == pytest.approx(len(tiles) / (5 * 6 / 2))


@pytest.mark.parametrize("bad", [
    lambda: VerticalSlashHead(vertical_size=10, slash_size=50, sink_tokens=30),
    lambda: BlockSparseHead(top_k_blocks=1),
    lambda: GridHead(0, 10, stride=4, phase_q=4),
    lambda: AShapeHead(window_tokens=0),
])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("first_pos,rows", [(0, 128), (0, 100), (37, 50), (70, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_contiguous_matches_pooled(first_pos, rows, dtype):
    """The CUDA pooling (padding + one sum per block) equals the reference's index_add_
    pooling of the float32 copies, for chunks that start and end inside blocks."""
    from attention_backends.patterns.minference.block_sparse import pooled, pooled_contiguous

    values = torch.randn(rows, 3, 8, generator=torch.Generator().manual_seed(rows)).to(dtype)
    num_blocks = -(-(first_pos + rows) // 16) + 1  # one block past the rows stays zero
    expected = pooled(values.float().permute(1, 0, 2), torch.arange(first_pos, first_pos + rows),
                      16, num_blocks)
    actual = pooled_contiguous(values, first_pos, 16, num_blocks)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads", [[0, 1, 2, 3, 4, 5], [1, 4, 5]])
def test_pooled_heads_cuda_path_matches_reference(heads):
    """The CUDA path of block-sparse pooling (keys pooled per KV head, then picked per query
    head) equals the reference path, on a chunk that starts inside a block."""
    from attention_backends.patterns.minference.block_sparse import (
        pooled_heads,
        pooled_heads_contiguous,
    )

    generator = torch.Generator().manual_seed(len(heads))
    chunk = SequenceChunk(torch.randn(45, 6, 8, generator=generator), torch.arange(75, 120),
                          torch.randn(120, 2, 8, generator=generator), 130, 0.3)
    expected = pooled_heads(chunk, heads, 16, 8)  # CPU: the reference path
    actual = pooled_heads_contiguous(chunk, heads, 16, 8)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
