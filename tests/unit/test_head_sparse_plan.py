"""The kernel plan covers exactly the index's kept pairs: listed tiles (masked per token)
plus gathered columns, disjoint, causal."""

import math

import pytest
import torch

from attention_backends.kernels.head_sparse_plan import make_plan, pack_bits
from attention_backends.patterns.minference import HeadsIndex, SequenceChunk
from tests.unit.test_head_sparse_ref import mixed_heads


def covered_pairs(plan, index, query_tiles):
    """Bool [H, N, N] of pairs a kernel following the plan computes (tiles masked by the
    index, columns causal), and the count of pairs computed twice."""
    tile, n = plan.tile, index.num_tokens
    computed = torch.zeros(index.num_heads, n, n, dtype=torch.int32)
    for h in range(index.num_heads):
        for slot, qt in enumerate(query_tiles.tolist()):
            rows = torch.arange(qt * tile, min(qt * tile + tile, n))
            for i in range(int(plan.tile_count[h, slot])):
                kt = int(plan.tile_index[h, slot, i])
                keys = torch.arange(kt * tile, min(kt * tile + tile, n))
                keep = index.keep_mask(rows, num_keys=n)[h][:, keys]
                computed[h, rows[:, None], keys[None, :]] += keep.int()
            for i in range(int(plan.column_count[h, slot])):
                k = int(plan.column_index[h, slot, i])
                computed[h, rows, k] += (rows >= k).int()
    return computed > 0, int((computed > 1).sum())


@pytest.mark.parametrize("num_tokens", [16, 61, 130])
def test_plan_covers_each_kept_pair_once(num_tokens):
    generator = torch.Generator().manual_seed(num_tokens)
    chunk = SequenceChunk(torch.randn(num_tokens, 6, 8, generator=generator),
                          torch.arange(num_tokens),
                          torch.randn(num_tokens, 2, 8, generator=generator), num_tokens,
                          1 / math.sqrt(8))
    index = mixed_heads(6).build_index(chunk)
    query_tiles = torch.arange(-(-num_tokens // 16))
    plan = make_plan(index, query_tiles)
    covered, twice = covered_pairs(plan, index, query_tiles)
    assert twice == 0
    assert torch.equal(covered, index.keep_mask(torch.arange(num_tokens)))


def test_scattered_columns_are_gathered_not_tiled():
    index = HeadsIndex.empty(1, 128, 16)
    index.diagonals[0, 0] = True
    index.columns[0, [3, 40, 77]] = True
    plan = make_plan(index, torch.tensor([7]))  # rows 112..127
    assert plan.tile_count[0, 0] == 1 and plan.tile_index[0, 0, 0] == 7
    assert plan.column_index[0, 0, : plan.column_count[0, 0]].tolist() == [3, 40, 77]


@pytest.mark.parametrize("reverse", [False, True])
def test_pack_bits_round_trip(reverse):
    flags = torch.rand(3, 77, generator=torch.Generator().manual_seed(1)) < 0.3
    words = pack_bits(flags, reverse=reverse)
    assert words.shape == (3, 3) and int(words.min()) >= 0 and int(words.max()) < 2**32
    bits = (words[..., None] >> torch.arange(32)) & 1  # [H, W, 32]
    unpacked = bits.flatten(1).bool()  # [H, 96]
    if reverse:  # packed index 32 W - 1 - k holds flag k
        unpacked = unpacked.flip(-1)
    assert torch.equal(unpacked[:, :77], flags)
    assert not unpacked[:, 77:].any()
