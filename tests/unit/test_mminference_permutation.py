"""MMInference's permutations: round trips, exact attention under permutation, and the
grid becoming block-sparse."""

import torch

from attention_backends.patterns.minference import SequenceChunk
from attention_backends.patterns.mminference.grid import GridHead
from attention_backends.patterns.mminference.permutation import (
    grid_permutation,
    inverse_permutation,
    modality_permutation,
    permuted_tile_mask,
)


def test_grid_permutation_round_trip_and_layout():
    perm = grid_permutation(20, vision_start=3, vision_end=17, stride=4)  # 3 whole frames + 2
    assert sorted(perm.tolist()) == list(range(20))
    assert perm[3:15].tolist() == [3, 7, 11, 4, 8, 12, 5, 9, 13, 6, 10, 14]
    assert perm[:3].tolist() == [0, 1, 2] and perm[15:].tolist() == [15, 16, 17, 18, 19]
    tokens = torch.randn(20, 5)
    assert torch.equal(tokens[perm][inverse_permutation(perm)], tokens)


def test_modality_permutation_groups_stably_and_round_trips():
    modality = torch.tensor([0, 1, 1, 0, 2, 1, 0])
    perm = modality_permutation(modality)
    assert perm.tolist() == [0, 3, 6, 1, 2, 5, 4]
    assert torch.equal(perm[inverse_permutation(perm)], torch.arange(7))


def test_attention_on_the_permuted_layout_is_exact_after_unpermuting():
    generator = torch.Generator().manual_seed(3)
    n = 50
    query, keys, values = (torch.randn(n, 2, 8, generator=generator, dtype=torch.float64)
                           for _ in range(3))
    head = GridHead(vision_start=5, vision_end=45, stride=8, phase_q=3, phase_k=1,
                    sink_tokens=2, window_tokens=4)
    chunk = SequenceChunk(query, torch.arange(n), keys, n, 0.3)
    keep = head.build(chunk, [0, 1], 16).keep_mask(torch.arange(n))

    def attend(q, k, v, mask):
        scores = torch.einsum("qhd,khd->hqk", q, k) * 0.3
        return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, -torch.inf).softmax(-1), v)

    perm = grid_permutation(n, 5, 45, 8)
    permuted = attend(query[perm], keys[perm], values[perm], keep[:, perm][:, :, perm])
    expected = attend(query, keys, values, keep)
    torch.testing.assert_close(permuted[inverse_permutation(perm)], expected)


def test_grid_lines_become_few_tiles_after_permutation():
    n, tile = 512, 16
    head = GridHead(vision_start=0, vision_end=n, stride=32, phase_q=7, phase_k=7,
                    sink_tokens=0, window_tokens=1)
    chunk = SequenceChunk(torch.zeros(n, 1, 4), torch.arange(n), torch.zeros(n, 1, 4), n, 1.0)
    keep = head.build(chunk, [0], tile).keep_mask(torch.arange(n))
    identity = permuted_tile_mask(keep, torch.arange(n), tile).sum()
    grouped = permuted_tile_mask(keep, grid_permutation(n, 0, n, 32), tile).sum()
    assert grouped < identity / 4
