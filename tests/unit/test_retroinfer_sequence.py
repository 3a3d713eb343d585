"""Decode steps over one sequence: generated tokens join the steady zone, then the index."""

from __future__ import annotations

import torch

from kv_manager.retroinfer.attention import dense_partial
from kv_manager.retroinfer.config import DecodeBudget, WaveIndexConfig
from kv_manager.retroinfer.sequence import LayerSequenceState

CONFIG = WaveIndexConfig(
    segment_tokens=256,
    tokens_per_cluster=8,
    kmeans_iterations=3,
    min_indexed_tokens=16,
    update_tokens=12,
    update_clusters=3,
)


def test_full_budget_decode_equals_dense_before_and_after_index_updates():
    generator = torch.Generator().manual_seed(0)
    total, heads, dim = 700, 2, 16
    keys = torch.randn(total, heads, dim, generator=generator)
    values = torch.randn(total, heads, dim, generator=generator)
    prompt = 660
    state = LayerSequenceState(keys[:prompt], values[:prompt], CONFIG)
    clusters_before = state.index.num_clusters
    for position in range(prompt, total):
        state.append(keys[position], values[position])
        query = torch.randn(heads, 3, dim, generator=generator)
        budget = DecodeBudget(state.index.num_clusters, 0)
        got = state.decode(query, budget).out[0]
        dense = dense_partial(
            query.unsqueeze(0),
            keys[: position + 1].transpose(0, 1),
            values[: position + 1].transpose(0, 1),
            dim**-0.5,
        ).out[0]
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert state.updates == 40 // 12
    assert state.index.num_clusters == clusters_before + 3 * state.updates
    assert state.generated_pending == 40 % 12
    indexed = torch.cat(
        [torch.arange(4, prompt - 64), torch.arange(prompt, prompt + 12 * state.updates)]
    )
    for head in range(heads):
        assert torch.equal(state.index.positions[head].sort().values, indexed)


def test_default_budget_grows_with_the_index():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(2000, 2, 16, generator=generator)
    state = LayerSequenceState(
        keys, keys.clone(), WaveIndexConfig(min_indexed_tokens=16, update_tokens=64)
    )
    before = state.budget()
    for _ in range(64):
        state.append(torch.randn(2, 16, generator=generator), torch.randn(2, 16))
    after = state.budget()
    assert state.updates == 1
    assert after.estimation_clusters > before.estimation_clusters
