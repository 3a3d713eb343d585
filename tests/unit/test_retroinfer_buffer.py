"""Wave buffer: rows served equal the index's rows; LRU replacement; transfer accounting."""

from __future__ import annotations

import torch

from kv_manager.retroinfer.config import WaveIndexConfig
from kv_manager.retroinfer.wave_buffer import WaveBuffer
from kv_manager.retroinfer.wave_index import build_wave_index

CONFIG = WaveIndexConfig(
    segment_tokens=256, tokens_per_cluster=8, kmeans_iterations=3, min_indexed_tokens=16
)


def _index(tokens: int = 600, heads: int = 2, dim: int = 16):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(tokens, heads, dim, generator=generator)
    values = torch.randn(tokens, heads, dim, generator=generator)
    return build_wave_index(keys, values, CONFIG)


def _rows(index, head: int, cluster: int):
    lo, hi = index.offsets[head, cluster], index.offsets[head, cluster + 1]
    return index.keys[head, lo:hi], index.values[head, lo:hi]


def _assert_batch_matches(batch, index, ids):
    for head in range(ids.shape[0]):
        for slot, cluster in enumerate(ids[head].tolist()):
            start, end = batch.ranges[head, slot].tolist()
            keys, values = _rows(index, head, cluster)
            assert torch.equal(batch.keys[head, start:end], keys)
            assert torch.equal(batch.values[head, start:end], values)


def test_gathered_rows_are_the_clusters_rows_on_miss_and_on_hit():
    index = _index()
    buffer = WaveBuffer(index, "cpu", capacity_pages=200, page_tokens=4)
    ids = torch.tensor([[3, 0, 9], [5, 2, 1]])
    _assert_batch_matches(buffer.gather(ids), index, ids)  # all misses
    _assert_batch_matches(buffer.gather(ids), index, ids)  # all hits, read from the cache
    assert buffer.stats.cluster_misses == 6 and buffer.stats.cluster_hits == 6


def test_host_to_device_bytes_count_missed_rows_only():
    index = _index()
    buffer = WaveBuffer(index, "cpu", capacity_pages=200, page_tokens=4)
    ids = torch.tensor([[3, 4], [7, 8]])
    buffer.gather(ids)
    rows = sum(int(index.sizes[h, c]) for h in range(2) for c in ids[h].tolist())
    assert buffer.stats.bytes_host_to_device == rows * 2 * 16 * 4
    assert buffer.stats.rows_missed == rows
    buffer.gather(ids)
    assert buffer.stats.bytes_host_to_device == rows * 2 * 16 * 4
    assert buffer.stats.rows_hit == rows


def test_least_recently_used_cluster_is_evicted_first():
    index = _index()
    small = [c for c in range(index.num_clusters) if 0 < int(index.sizes[0, c]) <= 4][:4]
    assert len(small) == 4
    other = [c for c in range(index.num_clusters) if int(index.sizes[1, c]) > 0][:4]
    buffer = WaveBuffer(index, "cpu", capacity_pages=3, page_tokens=4)  # 3 one-page clusters

    def ask(head0: int, head1: int) -> None:
        buffer.gather(torch.tensor([[head0], [head1]]))

    a, b, c, d = small
    for cluster, partner in zip((a, b, c), other[:3], strict=True):
        ask(cluster, partner)
    ask(a, other[0])  # a becomes most recent: b is now the least recently used
    ask(d, other[0])  # admitting d must evict b
    assert buffer.cached_clusters(0) == [c, a, d]
    assert buffer.stats.evictions >= 1
    before = buffer.stats.cluster_hits
    ask(a, other[0])
    assert buffer.stats.cluster_hits == before + 2


def test_clusters_in_use_this_step_are_never_evicted_and_oversized_are_not_admitted():
    index = _index()
    sizes = index.sizes[0]
    big = int(sizes.argmax())
    buffer = WaveBuffer(index, "cpu", capacity_pages=1, page_tokens=2)
    assert int(sizes[big]) > 2
    batch = buffer.gather(torch.tensor([[big], [0]]))
    _assert_batch_matches(batch, index, torch.tensor([[big], [0]]))
    assert buffer.cached_clusters(0) == []
    assert buffer.stats.not_admitted >= 1
