"""Specification of the dense and triangle patterns and the per-layer policy."""

import pytest
import torch

from attention_backends.patterns import (
    DensePattern,
    TrianglePattern,
    block_mask,
    causal_block_count,
    kept_block_fraction,
    make_pattern,
)
from attention_backends.policy import LayerPatternPolicy


def full_token_mask(pattern, num_tokens, prompt_len=None):
    positions = torch.arange(num_tokens)
    return pattern.token_mask(positions, positions, prompt_len or num_tokens)


def test_triangle_defaults_are_the_papers():
    pattern = TrianglePattern()
    assert (pattern.sink_tokens, pattern.window_tokens, pattern.last_q_tokens) == (8, 512, 128)


def test_dense_mask_is_causal():
    mask = full_token_mask(DensePattern(), 37)
    assert torch.equal(mask, torch.ones(37, 37, dtype=torch.bool).tril())


def test_triangle_row_keeps_sinks_window_and_itself():
    pattern = TrianglePattern(sink_tokens=2, window_tokens=3, last_q_tokens=1)
    mask = full_token_mask(pattern, 10)
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 4, 5, 6]


def test_triangle_last_rows_are_full_causal_rows():
    pattern = TrianglePattern(sink_tokens=1, window_tokens=2, last_q_tokens=3)
    mask = full_token_mask(pattern, 12)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(mask[9:], causal[9:])
    assert not torch.equal(mask[8], causal[8])


def test_last_rows_follow_the_prompt_not_the_chunk():
    pattern = TrianglePattern(sink_tokens=1, window_tokens=2, last_q_tokens=3)
    chunk_positions = torch.arange(0, 8)  # a first chunk of a 20-token prompt
    mask = pattern.token_mask(chunk_positions, torch.arange(8), prompt_len=20)
    assert mask[7].nonzero().flatten().tolist() == [0, 6, 7]


def test_key_ranges_cover_every_kept_key():
    pattern = TrianglePattern(sink_tokens=3, window_tokens=5, last_q_tokens=4)
    num_tokens = 40
    mask = full_token_mask(pattern, num_tokens)
    for first in range(0, num_tokens, 7):
        last = min(first + 6, num_tokens - 1)
        covered = torch.zeros(num_tokens, dtype=torch.bool)
        for lo, hi in pattern.key_ranges(first, last, num_tokens):
            covered[lo:hi] = True
        needed = mask[first : last + 1].any(dim=0)
        assert not (needed & ~covered).any()


def test_key_ranges_are_short_for_middle_rows():
    pattern = TrianglePattern(sink_tokens=8, window_tokens=512, last_q_tokens=128)
    ranges = pattern.key_ranges(10_000, 10_063, 32_768)
    assert ranges == [(0, 8), (10_000 - 511, 10_064)]


def test_kept_fraction_matches_token_mask():
    pattern = TrianglePattern(sink_tokens=3, window_tokens=7, last_q_tokens=5)
    num_tokens = 61
    mask = full_token_mask(pattern, num_tokens)
    assert pattern.kept_fraction(num_tokens) == pytest.approx(mask.sum().item() / (61 * 62 / 2))


def test_block_mask_matches_token_mask_blocks():
    pattern = TrianglePattern(sink_tokens=3, window_tokens=9, last_q_tokens=6, block_size=4)
    num_tokens = 50
    tokens = full_token_mask(pattern, num_tokens)
    padded = torch.zeros(52, 52, dtype=torch.bool)
    padded[:50, :50] = tokens
    expected = padded.view(13, 4, 13, 4).any(dim=3).any(dim=1)
    assert torch.equal(block_mask(pattern, num_tokens), expected)


def test_kept_block_fraction_of_dense_is_one():
    assert kept_block_fraction(DensePattern(block_size=16), 100) == 1.0
    assert causal_block_count(100, 16) == 28


def test_paper_pattern_keeps_a_few_percent_at_32k():
    fraction = TrianglePattern().kept_fraction(32_768)
    assert 0.035 < fraction < 0.045


def test_make_pattern_by_name():
    assert make_pattern("triangle", window_tokens=64) == TrianglePattern(window_tokens=64)
    assert make_pattern("dense").is_dense
    with pytest.raises(ValueError):
        make_pattern("vertical_slash")


def test_policy_dense_first_layers():
    policy = LayerPatternPolicy(sparse_pattern=TrianglePattern(), dense_first_layers=16)
    assert policy.pattern_for_layer(15).is_dense
    assert policy.pattern_for_layer(16) == TrianglePattern()


def test_policy_explicit_dense_layers_override_the_count():
    policy = LayerPatternPolicy.from_values("triangle", dense_first_layers=4, dense_layers=[0, 7])
    assert [policy.pattern_for_layer(i).is_dense for i in range(9)] == [
        True, False, False, False, False, False, False, True, False,
    ]  # fmt: skip


def test_policy_from_values_passes_pattern_parameters():
    policy = LayerPatternPolicy.from_values("triangle", 2, sink_tokens=4, window_tokens=256)
    assert policy.pattern_for_layer(3) == TrianglePattern(sink_tokens=4, window_tokens=256)


def test_invalid_window_is_rejected():
    with pytest.raises(ValueError):
        TrianglePattern(window_tokens=0)
