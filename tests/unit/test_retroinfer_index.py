"""Wave index build and tripartite decode: invariants, exact-budget equality, the bound."""

from __future__ import annotations

import pytest
import torch

from kv_manager.retroinfer.attention import (
    Partial,
    dense_partial,
    merge_partials,
    retroinfer_decode,
)
from kv_manager.retroinfer.config import DecodeBudget, WaveIndexConfig
from kv_manager.retroinfer.wave_index import build_wave_index, spherical_kmeans

CONFIG = WaveIndexConfig(
    segment_tokens=512, tokens_per_cluster=16, kmeans_iterations=5, min_indexed_tokens=16
)


def _kv(tokens: int, heads: int = 2, dim: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # A shared offset plus structure: real keys have a large common component.
    keys = torch.randn(tokens, heads, dim, generator=generator) + 3.0
    values = torch.randn(tokens, heads, dim, generator=generator)
    return keys, values


def _steady(keys: torch.Tensor, values: torch.Tensor, config: WaveIndexConfig):
    rows = list(range(config.sink_tokens)) + list(
        range(len(keys) - config.recent_tokens, len(keys))
    )
    return keys[rows].transpose(0, 1), values[rows].transpose(0, 1)


def test_segments_cover_indexed_tokens_with_official_count():
    config = WaveIndexConfig()
    lengths = config.segment_lengths(131072 - 68)
    assert sum(lengths) == 131072 - 68
    assert len(lengths) == 16 and max(lengths) - min(lengths) <= 1
    assert config.segment_lengths(100) == [100]


def test_index_is_a_partition_of_the_middle_tokens():
    keys, values = _kv(1500)
    index = build_wave_index(keys, values, CONFIG)
    middle = torch.arange(CONFIG.sink_tokens, 1500 - CONFIG.recent_tokens)
    for head in range(2):
        assert torch.equal(index.positions[head].sort().values, middle)
        assert torch.equal(index.keys[head], keys[index.positions[head], head])
        assert torch.equal(index.values[head], values[index.positions[head], head])
    assert torch.equal(index.offsets[:, -1], torch.full((2,), len(middle)))
    assert torch.equal(index.offsets[:, 1:] - index.offsets[:, :-1], index.sizes)


def test_cluster_summaries_match_their_members():
    keys, values = _kv(900, seed=1)
    index = build_wave_index(keys, values, CONFIG)
    for head in range(2):
        for cluster in range(0, index.num_clusters, 7):
            lo, hi = index.offsets[head, cluster], index.offsets[head, cluster + 1]
            if hi == lo:
                continue
            member_keys = index.keys[head, lo:hi]
            torch.testing.assert_close(index.centroids[head, cluster], member_keys.mean(0))
            torch.testing.assert_close(
                index.value_sums[head, cluster], index.values[head, lo:hi].sum(0)
            )
            distances = (member_keys - member_keys.mean(0)).norm(dim=-1)
            torch.testing.assert_close(index.radii[head, cluster], distances.max())


def test_clusters_stay_inside_their_segment():
    keys, values = _kv(1200, seed=2)
    index = build_wave_index(keys, values, CONFIG)
    lengths = CONFIG.segment_lengths(1200 - 68)
    bounds = torch.tensor([0] + lengths).cumsum(0) + CONFIG.sink_tokens
    clusters = torch.tensor([0] + [CONFIG.clusters_per_segment(n) for n in lengths]).cumsum(0)
    owner = index.cluster_of_rows()
    segment_of_position = torch.bucketize(index.positions, bounds[1:], right=True)
    segment_of_cluster = torch.bucketize(owner, clusters[1:], right=True)
    assert torch.equal(segment_of_position, segment_of_cluster)


def test_kmeans_separates_well_separated_directions():
    generator = torch.Generator().manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    labels = torch.arange(400) % 4
    points = directions[labels] * 5 + 0.1 * torch.randn(400, 16, generator=generator)
    assign = spherical_kmeans(points.unsqueeze(0), 4, iterations=10)[0]
    # Each true group lands in exactly one cluster and no two groups share one.
    groups = {tuple(assign[labels == g].unique().tolist()) for g in range(4)}
    assert all(len(group) == 1 for group in groups) and len(groups) == 4


@pytest.mark.parametrize("group", [1, 4])
def test_full_retrieval_budget_equals_dense_attention(group):
    keys, values = _kv(1300, seed=4)
    index = build_wave_index(keys, values, CONFIG)
    query = torch.randn(3, 2, group, 32, generator=torch.Generator().manual_seed(5))
    budget = DecodeBudget(index.num_clusters, 0)
    result = retroinfer_decode(query, index, *_steady(keys, values, CONFIG), budget)
    dense = dense_partial(query, keys.transpose(0, 1), values.transpose(0, 1), 32**-0.5)
    torch.testing.assert_close(result.out, dense.out, rtol=1e-5, atol=1e-5)
    assert float(result.weight_error_bound.max()) < 1e-6


def test_estimating_every_cluster_of_identical_keys_is_exact():
    # A cluster of identical keys has radius 0: its estimate is exact, and the bound is 0.
    keys, values = _kv(700, seed=6)
    keys[:] = keys[0]
    index = build_wave_index(keys, values, CONFIG)
    query = torch.randn(2, 2, 2, 32, generator=torch.Generator().manual_seed(7))
    budget = DecodeBudget(1, index.num_clusters - 1)
    result = retroinfer_decode(query, index, *_steady(keys, values, CONFIG), budget)
    dense = dense_partial(query, keys.transpose(0, 1), values.transpose(0, 1), 32**-0.5)
    torch.testing.assert_close(result.out, dense.out, rtol=1e-4, atol=1e-5)


def test_accuracy_bound_holds_and_shrinks_with_budget():
    keys, values = _kv(2000, seed=8)
    index = build_wave_index(keys, values, CONFIG)
    query = torch.randn(4, 2, 3, 32, generator=torch.Generator().manual_seed(9)) * 2
    dense = dense_partial(query, keys.transpose(0, 1), values.transpose(0, 1), 32**-0.5)
    steady = _steady(keys, values, CONFIG)
    bounds = []
    for retrieval in (4, 20, index.num_clusters // 2):
        budget = DecodeBudget(retrieval, index.num_clusters // 4)
        result = retroinfer_decode(query, index, *steady, budget)
        error = (result.out - dense.out).norm(dim=-1)
        assert bool((error <= result.output_error_bound + 1e-5).all())
        bounds.append(float(result.weight_error_bound.mean()))
    assert bounds[0] >= bounds[1] >= bounds[2]


def test_retrieval_picks_the_cluster_holding_a_planted_key():
    keys, values = _kv(1500, seed=10)
    query = torch.randn(1, 2, 2, 32, generator=torch.Generator().manual_seed(11))
    keys[700, 0] = query[0, 0, 0] * 3  # a key the first head's queries attend to strongly
    index = build_wave_index(keys, values, CONFIG)
    budget = DecodeBudget(2, 0)
    result = retroinfer_decode(query, index, *_steady(keys, values, CONFIG), budget)
    owner = index.cluster_of_rows()[0, (index.positions[0] == 700).nonzero()[0, 0]]
    assert int(owner) in result.parts.retrieval_ids[0, 0].tolist()


def test_merge_of_split_subsets_equals_attention_over_their_union():
    generator = torch.Generator().manual_seed(12)
    query = torch.randn(2, 1, 3, 8, generator=generator)
    keys, values = torch.randn(1, 40, 8, generator=generator), torch.randn(1, 40, 8)
    whole = dense_partial(query, keys, values, 0.5)
    parts = [
        dense_partial(query, keys[:, a:b], values[:, a:b], 0.5)
        for a, b in ((0, 5), (5, 31), (31, 40))
    ]
    empty = Partial(out=torch.zeros_like(whole.out), lse=torch.full_like(whole.lse, float("-inf")))
    merged = merge_partials(*parts, empty)
    torch.testing.assert_close(merged.out, whole.out)
    torch.testing.assert_close(merged.lse, whole.lse)


@pytest.mark.parametrize(
    "value_shape", [(1, 3, 1, 7, 5), (4, 3, 1, 7, 5), (3, 1, 7, 5), (1, 1, 2, 7, 5)]
)
def test_weighted_sum_equals_broadcast_matmul(value_shape):
    from kv_manager.retroinfer.attention import weighted_sum

    generator = torch.Generator().manual_seed(13)
    probs = torch.rand(4, 3, 2, 7, generator=generator)
    values = torch.randn(*value_shape, generator=generator)
    expected = (probs.unsqueeze(-2) @ values).squeeze(-2)
    torch.testing.assert_close(weighted_sum(probs, values), expected)


def test_gathered_retrieval_equals_attention_over_the_chosen_clusters_rows():
    from kv_manager.retroinfer.attention import retrieval_partial

    keys, values = _kv(1400, seed=14)
    index = build_wave_index(keys, values, CONFIG)
    generator = torch.Generator().manual_seed(15)
    query = torch.randn(3, 2, 2, 32, generator=generator)
    ids = torch.stack(
        [
            torch.stack(
                [torch.randperm(index.num_clusters, generator=generator)[:9] for _ in range(2)]
            )
            for _ in range(3)
        ]
    )  # [P, H, 9]
    got = retrieval_partial(query, index, ids, 0.2)
    owner = index.cluster_of_rows()
    for p in range(3):
        for h in range(2):
            rows = torch.isin(owner[h], ids[p, h])
            expected = dense_partial(
                query[p : p + 1, h : h + 1],
                index.keys[h : h + 1, rows],
                index.values[h : h + 1, rows],
                0.2,
            )
            torch.testing.assert_close(got.out[p, h], expected.out[0, 0])
            torch.testing.assert_close(got.lse[p, h], expected.lse[0, 0])
