"""Torch reference of the GPU decode steps, in the GPU layout (the Triton kernels' contract).

Rows ``R`` = sequences x KV heads, flattened; ``G`` query heads per KV head; ``d`` head dim.
Every index tensor of a row is that row's WaveIndex (``../wave_index.py``) with the steady zone
appended after the clustered rows of ``keys``/``values``, so that one "ranges" attention serves
the retrieval clusters and the steady zone alike (and Quest-style pages: a page is a range).
Float math in float32, whatever the input dtype.
"""

from __future__ import annotations

import torch

from kv_manager.retroinfer.attention import Partial, masked_partial, merge_partials


def centroid_logits_ref(
    query: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor, scale: float
) -> torch.Tensor:
    """[R, G, C] float32 scaled q.c; -inf where the cluster is empty.
    query [R, G, d], centroids [R, C, d], sizes [R, C]."""
    logits = (query.float() @ centroids.float().transpose(1, 2)) * scale
    return logits.masked_fill((sizes == 0).unsqueeze(1), float("-inf"))


def rank_ref(logits: torch.Tensor) -> torch.Tensor:
    """[R, C] ranking score: the GQA group's summed softmax over clusters (official rule)."""
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=1)


def choose_clusters_ref(
    logits: torch.Tensor, retrieval: int, estimation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval ids [R, retrieval] and estimation ids [R, estimation] (int64), ranked by the
    GQA group's summed softmax over clusters (same rule as ``attention.choose_clusters``)."""
    chosen = rank_ref(logits).topk(retrieval + estimation, dim=-1).indices
    return chosen[:, :retrieval], chosen[:, retrieval:]


def cluster_ranges(
    offsets: torch.Tensor, cluster_ids: torch.Tensor, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """[R, n (+ e), 2] int32 row ranges of the chosen clusters, then ``extra`` ranges
    (e.g. the steady zone, [R, e, 2])."""
    ranges = torch.stack(
        [offsets.gather(1, cluster_ids), offsets.gather(1, cluster_ids + 1)], dim=-1
    ).to(torch.int32)
    return ranges if extra is None else torch.cat([ranges, extra.to(torch.int32)], dim=1)


def ranges_attention_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    ranges: torch.Tensor,
    scale: float,
) -> Partial:
    """Exact attention of query [R, G, d] over the rows of ``ranges`` [R, n, 2] (disjoint)
    of keys/values [R, N, d]."""
    rows = torch.arange(keys.shape[1], device=keys.device)
    starts, ends = ranges[..., 0:1].long(), ranges[..., 1:2].long()
    keep = ((rows >= starts) & (rows < ends)).any(dim=1)  # [R, N]
    logits = (query.float() @ keys.float().transpose(1, 2)) * scale
    return masked_partial(logits, values.float().unsqueeze(1), keep=keep.unsqueeze(1))


def estimation_ref(
    logits: torch.Tensor, value_sums: torch.Tensor, sizes: torch.Tensor, cluster_ids: torch.Tensor
) -> Partial:
    """Estimated zone: cluster c stands for |c| keys with logit ``logits[c]`` and mean value
    ``V_c / |c|``. logits [R, G, C], value_sums [R, C, d], sizes [R, C], ids [R, E]."""
    chosen = torch.zeros_like(sizes, dtype=torch.bool).scatter_(1, cluster_ids, True)
    keep = (chosen & (sizes > 0)).unsqueeze(1)
    counts = sizes.clamp(min=1).float()
    mean_values = value_sums.float() / counts.unsqueeze(-1)
    return masked_partial(
        logits, mean_values.unsqueeze(1), keep=keep, log_weight=counts.log().unsqueeze(1)
    )


def merge_ref(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Merge S partials: outs [R, S, G, d], lses [R, S, G] -> [R, G, d] float32."""
    parts = [Partial(out=outs[:, s].float(), lse=lses[:, s].float()) for s in range(outs.shape[1])]
    return merge_partials(*parts).out


def decode_step_ref(
    query: torch.Tensor,
    centroids: torch.Tensor,
    value_sums: torch.Tensor,
    sizes: torch.Tensor,
    offsets: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    steady_ranges: torch.Tensor,
    retrieval: int,
    estimation: int,
    scale: float,
) -> torch.Tensor:
    """The whole GPU decode step in torch: [R, G, d] float32."""
    logits = centroid_logits_ref(query, centroids, sizes, scale)
    retrieval_ids, estimation_ids = choose_clusters_ref(logits, retrieval, estimation)
    ranges = cluster_ranges(offsets, retrieval_ids, steady_ranges)
    exact = ranges_attention_ref(query, keys, values, ranges, scale)
    if estimation == 0:
        return exact.out
    return merge_partials(exact, estimation_ref(logits, value_sums, sizes, estimation_ids)).out
