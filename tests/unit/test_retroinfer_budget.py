"""Decode budgets with a minimum exact-token count (``min_exact_tokens``): invariants and
exactness when the floor covers every cluster."""

from __future__ import annotations

import math

import pytest
import torch

from attention_backends.config import AttentionSettings
from kv_manager.retroinfer.attention import dense_partial
from kv_manager.retroinfer.config import DecodeBudget, WaveIndexConfig
from kv_manager.retroinfer.sequence import LayerSequenceState

SMALL = WaveIndexConfig(
    segment_tokens=256, tokens_per_cluster=8, kmeans_iterations=3, min_indexed_tokens=16
)


def test_zero_floor_is_the_papers_fraction_budget():
    for clusters in (1, 7, 241, 436, 8192):
        config = WaveIndexConfig()
        got = DecodeBudget.for_index(clusters, clusters * 16, config)
        assert got == DecodeBudget.from_fractions(clusters, 0.018, 0.232)


@pytest.mark.parametrize("clusters,indexed", [(241, 3852), (436, 6972), (8192, 131000), (5, 40)])
@pytest.mark.parametrize("floor", [0, 1, 100, 512, 1024, 10**6])
def test_floor_invariants(clusters: int, indexed: int, floor: int):
    config = WaveIndexConfig(min_exact_tokens=floor)
    budget = DecodeBudget.for_index(clusters, indexed, config)
    paper = DecodeBudget.for_index(clusters, indexed, WaveIndexConfig())
    average = indexed / clusters
    # Never fewer than the paper's fraction, never more than the index holds.
    assert paper.retrieval_clusters <= budget.retrieval_clusters <= clusters
    assert budget.estimation_clusters >= 0
    assert budget.retrieval_clusters + budget.estimation_clusters <= clusters
    # The floor is met in average-size clusters, by the fewest clusters that meet it.
    if budget.retrieval_clusters < clusters:
        assert budget.retrieval_clusters * average >= floor - 1e-9
    if budget.retrieval_clusters > paper.retrieval_clusters:
        assert (budget.retrieval_clusters - 1) * average < floor
    # Estimation keeps its fraction until the retrieved clusters leave too few.
    assert budget.estimation_clusters == min(
        round(clusters * 0.232), clusters - budget.retrieval_clusters
    )


def test_floor_is_monotone():
    counts = [
        DecodeBudget.for_index(436, 6972, WaveIndexConfig(min_exact_tokens=floor))
        for floor in range(0, 8000, 37)
    ]
    retrieval = [b.retrieval_clusters for b in counts]
    assert retrieval == sorted(retrieval) and retrieval[-1] == 436
    assert retrieval[0] == 8  # the paper's 1.8% of 436


def test_the_floor_uses_the_index_average_cluster_size():
    # 1,000 tokens in 50 clusters (20 a cluster): 512 tokens -> ceil(25.6) = 26 clusters,
    # although the configured average (16) would give 32.
    budget = DecodeBudget.for_index(50, 1000, WaveIndexConfig(min_exact_tokens=512))
    assert budget.retrieval_clusters == math.ceil(512 / 20) == 26


def test_a_floor_covering_the_index_decodes_exactly_and_a_smaller_one_does_not():
    generator = torch.Generator().manual_seed(0)
    prompt, heads, dim = 700, 2, 16
    keys = torch.randn(prompt + 3, heads, dim, generator=generator)
    values = torch.randn(prompt + 3, heads, dim, generator=generator)
    indexed = prompt - SMALL.sink_tokens - SMALL.recent_tokens
    covering = WaveIndexConfig(**{**SMALL.__dict__, "min_exact_tokens": indexed})
    partial = WaveIndexConfig(**{**SMALL.__dict__, "min_exact_tokens": 64})
    states = {
        name: LayerSequenceState(keys[:prompt], values[:prompt], config)
        for name, config in (("covering", covering), ("partial", partial))
    }
    assert states["covering"].budget().retrieval_clusters == states["covering"].index.num_clusters
    assert states["partial"].budget().retrieval_clusters < states["partial"].index.num_clusters
    for position in range(prompt, prompt + 3):
        query = torch.randn(heads, 3, dim, generator=generator)
        exact = dense_partial(
            query.unsqueeze(0),
            keys[: position + 1].transpose(0, 1),
            values[: position + 1].transpose(0, 1),
            dim**-0.5,
        ).out[0]
        outs = {}
        for name, state in states.items():
            state.append(keys[position], values[position])
            outs[name] = state.decode(query).out[0]  # the state's own (configured) budget
        torch.testing.assert_close(outs["covering"], exact, rtol=1e-5, atol=1e-5)
        assert (outs["partial"] - exact).abs().max() > 1e-4


def test_served_settings_reach_the_wave_index_config(monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_RETROINFER_MIN_EXACT_TOKENS", "640")
    monkeypatch.setenv("TESSERA_ATTENTION_RETROINFER_RETRIEVAL_FRACTION", "0")
    monkeypatch.setenv("TESSERA_ATTENTION_RETROINFER_ESTIMATION_FRACTION", "0.1")
    config = AttentionSettings().retroinfer_config()
    assert (config.min_exact_tokens, config.retrieval_fraction, config.estimation_fraction) == (
        640,
        0.0,
        0.1,
    )
    assert config.segment_tokens == WaveIndexConfig().segment_tokens  # the rest: official
