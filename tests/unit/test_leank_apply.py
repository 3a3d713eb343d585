"""Pruned decode on kept channels equals dense attention with the dropped channels zeroed."""

from __future__ import annotations

import pytest
import torch

from kv_manager.leank.apply import (
    live_values,
    masked_dense_attention,
    prune_keys,
    pruned_decode_attention,
    pruned_value_sum,
)
from kv_manager.leank.layout import LayerLayout


def _keep(kv_heads: int, head_dim: int, counts: list[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.zeros(kv_heads, head_dim, dtype=torch.bool)
    for head, count in enumerate(counts):
        keep[head, torch.randperm(head_dim, generator=generator)[:count]] = True
    return keep


@pytest.mark.parametrize("counts", [[16, 32, 48], [0, 16, 64], [0, 0, 16]])
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_pruned_decode_matches_zeroed_channel_dense(counts, tokens):
    generator = torch.Generator().manual_seed(tokens)
    keep = _keep(3, 64, counts, seed=tokens)
    layout = LayerLayout(keep)
    query = torch.randn(9, 64, generator=generator)
    keys = torch.randn(tokens, 3, 64, generator=generator) * 3
    values = torch.randn(tokens, 3, 64, generator=generator)
    expected = masked_dense_attention(query.unsqueeze(0), keys, values, keep, causal=True)[0]
    got = pruned_decode_attention(query, prune_keys(keys, layout), live_values(values, layout),
                                  pruned_value_sum(values, layout), layout)
    row_error = (got - expected).abs().amax(dim=1)
    assert bool((row_error <= 1e-5 * (1 + expected.abs().amax(dim=1))).all()), row_error


def test_zeroed_channels_change_the_answer():
    # The comparison above could not pass by accident: masking really changes attention.
    generator = torch.Generator().manual_seed(0)
    keep = _keep(3, 64, [16, 16, 16], seed=0)
    query = torch.randn(1, 9, 64, generator=generator)
    keys, values = (torch.randn(50, 3, 64, generator=generator) for _ in range(2))
    dense = masked_dense_attention(query, keys, values, torch.ones_like(keep), causal=True)
    masked = masked_dense_attention(query, keys, values, keep, causal=True)
    assert float((dense - masked).abs().max()) > 1e-2


def test_prune_keys_packs_heads_in_order():
    keep = torch.zeros(2, 4, dtype=torch.bool)
    keep[0, [1, 3]] = True
    keep[1, [0]] = True
    keys = torch.arange(8, dtype=torch.float32).view(1, 2, 4)
    layout = LayerLayout(keep)
    assert prune_keys(keys, layout).tolist() == [[1.0, 3.0, 4.0]]
    assert layout.k_offsets.tolist() == [0, 2] and layout.k_counts.tolist() == [2, 1]


def test_fully_pruned_head_needs_no_value_pages():
    keep = _keep(3, 64, [0, 16, 32], seed=1)
    layout = LayerLayout(keep)
    assert layout.pruned_heads == [0] and layout.live_heads == [1, 2]
    assert live_values(torch.zeros(5, 3, 64), layout).shape == (5, 2, 64)
    sizes = layout.bytes_per_token(2)
    assert sizes == {"k_dense": 384, "k_stored": 96, "v_dense": 384, "v_stored": 256}


def test_causal_prefill_reference_is_causal():
    generator = torch.Generator().manual_seed(2)
    keep = torch.ones(1, 8, dtype=torch.bool)
    q, k, v = (torch.randn(6, 1, 8, generator=generator) for _ in range(3))
    first = masked_dense_attention(q[:1], k[:1], v[:1], keep, causal=True)
    full = masked_dense_attention(q, k, v, keep, causal=True)
    assert torch.allclose(full[0], first[0], atol=1e-6)
    assert torch.allclose(full[0, 0], v[0, 0], atol=1e-6)
