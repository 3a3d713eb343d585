"""Wave index build: segmented spherical k-means over one layer's keys (paper sec. 4.3).

For each KV head, the indexed keys (positions ``[sink, T - recent)``) are cut into near-equal
segments of about ``segment_tokens``; inside each segment, keys centred by the head's mean key
are clustered by spherical k-means (max inner product assignment to unit centroids, evenly
spaced tokens as the initial centroids), ``kmeans_iterations`` rounds. Clustering inside a
segment keeps the cost linear in the context (each key meets only its segment's centroids)
and keeps clusters local, which the paper motivates by the locality of attention.

The index stores, per head and cluster c: the arithmetic mean key ``centroid_c`` of the raw
(uncentred) member keys, the value sum ``V_c``, the size ``|c|`` and the radius
``r_c = max_j ||k_j - centroid_c||`` (for the accuracy bound, ``attention.py``), and the K/V
rows themselves permuted so that every cluster is one contiguous range (``offsets``): that is
the layout the wave buffer moves and the GPU kernels read.

Choice (ours): the final assignment stays inside the segment (the official code re-assigns
every token against all centroids once). Segment-local clusters depend only on their own
tokens, so a chunked prefill can build them chunk by chunk; cost O(N * C_segment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_manager.retroinfer.config import WaveIndexConfig


@dataclass
class WaveIndex:
    """One layer's index for one sequence. Shapes: H = KV heads, C = clusters, N = indexed
    tokens, d = head dim. Float tensors of the index are float32; keys/values keep the
    cache dtype."""

    centroids: torch.Tensor  # [H, C, d] mean member key
    value_sums: torch.Tensor  # [H, C, d]
    sizes: torch.Tensor  # [H, C] int64
    radii: torch.Tensor  # [H, C] max distance member -> centroid
    offsets: torch.Tensor  # [H, C + 1] int64, cluster c = sorted rows offsets[c]:offsets[c+1]
    positions: torch.Tensor  # [H, N] int64, sequence position of each sorted row
    keys: torch.Tensor  # [H, N, d] cluster-contiguous
    values: torch.Tensor  # [H, N, d] cluster-contiguous
    first_position: int  # first indexed position (= sink tokens)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def value_norm_max(self) -> torch.Tensor:
        """[H] largest value norm among the indexed tokens (scales the output bound)."""
        return self.values.float().norm(dim=-1).amax(dim=-1)

    def cluster_of_rows(self) -> torch.Tensor:
        """[H, N] cluster id of each sorted row."""
        rows = torch.arange(self.num_tokens, device=self.offsets.device)
        return torch.searchsorted(
            self.offsets[:, 1:].contiguous(),
            rows.expand(self.offsets.shape[0], -1).contiguous(),
            right=True,
        )


def spherical_kmeans(points: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """Cluster ``points`` [H, n, d] (float32) into ``clusters`` per head; returns the
    assignment [H, n] int64. Empty clusters keep their previous centroid."""
    heads, n, _ = points.shape
    unit = torch.nn.functional.normalize(points, dim=-1)
    init = torch.linspace(0, n - 1, clusters, device=points.device).round().long()
    centroids = unit[:, init]
    for _ in range(iterations):
        assign = (unit @ centroids.transpose(1, 2)).argmax(dim=-1)
        sums = torch.zeros_like(centroids).scatter_add_(
            1, assign.unsqueeze(-1).expand_as(unit), unit
        )
        counts = torch.zeros(heads, clusters, device=points.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32)
        )
        updated = torch.nn.functional.normalize(sums, dim=-1)
        centroids = torch.where((counts > 0).unsqueeze(-1), updated, centroids)
    return (unit @ centroids.transpose(1, 2)).argmax(dim=-1)


def _cluster_segment(
    keys: torch.Tensor,
    values: torch.Tensor,
    assign: torch.Tensor,
    num_clusters: int,
    first_position: int,
) -> WaveIndex:
    """Summaries and the cluster-contiguous layout of keys/values [H, N, d] given each
    token's cluster ``assign`` [H, N]; positions start at ``first_position``."""
    heads, _, dim = keys.shape
    order = torch.argsort(assign, dim=1, stable=True)
    sorted_assign = assign.gather(1, order)
    sizes = torch.zeros(heads, num_clusters, dtype=torch.int64, device=keys.device)
    sizes.scatter_add_(1, assign, torch.ones_like(assign))
    offsets = torch.nn.functional.pad(sizes.cumsum(dim=1), (1, 0))
    gather = order.unsqueeze(-1).expand(-1, -1, dim)
    sorted_keys = keys.gather(1, gather)
    sorted_values = values.gather(1, gather)
    index = sorted_assign.unsqueeze(-1).expand(-1, -1, dim)
    key_sums = torch.zeros(heads, num_clusters, dim, device=keys.device).scatter_add_(
        1, index, sorted_keys.float()
    )
    value_sums = torch.zeros_like(key_sums).scatter_add_(1, index, sorted_values.float())
    centroids = key_sums / sizes.clamp(min=1).unsqueeze(-1)
    distances = (sorted_keys.float() - centroids.gather(1, index)).norm(dim=-1)
    radii = torch.zeros(heads, num_clusters, device=keys.device).scatter_reduce_(
        1, sorted_assign, distances, reduce="amax", include_self=True
    )
    return WaveIndex(
        centroids=centroids,
        value_sums=value_sums,
        sizes=sizes,
        radii=radii,
        offsets=offsets,
        positions=order + first_position,
        keys=sorted_keys.contiguous(),
        values=sorted_values.contiguous(),
        first_position=first_position,
    )


def extend_wave_index(
    index: WaveIndex,
    keys: torch.Tensor,
    values: torch.Tensor,
    first_position: int,
    config: WaveIndexConfig | None = None,
) -> WaveIndex:
    """Decode-time update: tokens [T, H, d] that leave the steady zone (generated tokens,
    ``first_position`` onwards) become one new segment of ``update_clusters`` clusters,
    appended after the existing ones (existing clusters are untouched)."""
    config = config or WaveIndexConfig()
    new_keys, new_values = keys.transpose(0, 1), values.transpose(0, 1)
    raw = new_keys.float()
    clusters = min(config.update_clusters, raw.shape[1])
    assign = spherical_kmeans(
        raw - raw.mean(dim=1, keepdim=True), clusters, config.kmeans_iterations
    )
    part = _cluster_segment(new_keys, new_values, assign, clusters, first_position)
    return WaveIndex(
        centroids=torch.cat([index.centroids, part.centroids], dim=1),
        value_sums=torch.cat([index.value_sums, part.value_sums], dim=1),
        sizes=torch.cat([index.sizes, part.sizes], dim=1),
        radii=torch.cat([index.radii, part.radii], dim=1),
        offsets=torch.cat([index.offsets, part.offsets[:, 1:] + index.offsets[:, -1:]], dim=1),
        positions=torch.cat([index.positions, part.positions], dim=1),
        keys=torch.cat([index.keys, part.keys], dim=1),
        values=torch.cat([index.values, part.values], dim=1),
        first_position=index.first_position,
    )


def build_wave_index(
    keys: torch.Tensor, values: torch.Tensor, config: WaveIndexConfig | None = None
) -> WaveIndex:
    """Index the middle of one layer's prompt KV.

    keys, values: [T, H, d] post-RoPE, any float dtype (what the cache holds).
    The steady zone (first ``sink_tokens``, last ``recent_tokens``) is not indexed.
    """
    config = config or WaveIndexConfig()
    total = keys.shape[0]
    start, stop = config.sink_tokens, total - config.recent_tokens
    if stop - start < 1:
        raise ValueError(f"{total} tokens leave nothing to index")
    mid_keys = keys[start:stop].transpose(0, 1)  # [H, N, d]
    mid_values = values[start:stop].transpose(0, 1)
    raw = mid_keys.float()
    # Centring by the head's mean key: keys share a large common component, which would
    # otherwise dominate every cosine and make spherical clusters meaningless.
    centred = raw - raw.mean(dim=1, keepdim=True)
    assign_parts, first_cluster = [], 0
    segment_start = 0
    for length in config.segment_lengths(mid_keys.shape[1]):
        clusters = config.clusters_per_segment(length)
        part = centred[:, segment_start : segment_start + length]
        assign_parts.append(
            spherical_kmeans(part, clusters, config.kmeans_iterations) + first_cluster
        )
        first_cluster += clusters
        segment_start += length
    assign = torch.cat(assign_parts, dim=1)  # [H, N]
    return _cluster_segment(mid_keys, mid_values, assign, first_cluster, start)
