"""Tripartite decode attention over a wave index, torch reference (paper sec. 4.1-4.2).

For one decode query q (scale s = 1/sqrt(d)) and a KV head's index, the keys split in three:

- steady zone (sink + recent prompt tokens + generated tokens): exact, ``dense_partial``;
- retrieval zone: the ``R`` clusters ranked highest by centroid score, exact over their rows;
- estimation zone: the next ``E`` clusters, each standing in for its members with logit
  ``s q.c`` and multiplicity ``|c|``: mass ``Z_E = sum_c |c| exp(s q.c)`` and numerator
  ``sum_c exp(s q.c) V_c`` (``V_c`` = value sum);
- the remaining clusters are skipped.

Ranking (official code): per KV head, the softmax over clusters of ``s q_h.c`` for each query
head h of the GQA group, summed over the group; empty clusters never rank.

Each zone yields a partial ``(out, lse)`` (normalised output, log of its softmax mass); the
zones combine exactly by log-sum-exp: ``merge_partials``. With ``R`` = every cluster the
result equals dense attention (tests).

Accuracy bookkeeping (ours; derived, since the paper's formal statement was not readable
from this session): a member key lies within ``r_c`` of its centroid, so by Cauchy-Schwarz
``|s q.k_j - s q.c| <= a_c = s ||q|| r_c``. Hence the true mass of an estimated cluster lies in
``|c| exp(s q.c) [e^-a_c, e^a_c]``, the per-token weight error of the estimate is at most
``exp(s q.c)(e^a_c - 1)`` and a skipped cluster's mass is at most ``|c| exp(s q.c + a_c)``.
With ``Z_lo`` = exact mass + the estimated zone's lower mass, the L1 distance between the true
and the approximated attention weights obeys

    sum_j |p_j - p^_j|
        <= 2 (sum_E |c| e^{s q.c} (e^{a_c} - 1) + sum_skip |c| e^{s q.c + a_c}) / Z_lo

and the output error ``||o - o^|| <= min(that, 2) * max_j ||v_j||``. This bound always holds
(a failure would be a bug); how tight it is on real keys is what the fidelity benchmark reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kv_manager.retroinfer.config import DecodeBudget
from kv_manager.retroinfer.wave_index import WaveIndex

NEG_INF = float("-inf")


@dataclass
class Partial:
    """Softmax attention over a subset of keys: ``out`` [..., d] normalised over the subset
    (zeros if empty), ``lse`` [...] log of the subset's mass (-inf if empty). float32."""

    out: torch.Tensor
    lse: torch.Tensor


def merge_partials(*parts: Partial) -> Partial:
    """Exact combination of attention over disjoint key subsets (log-sum-exp weights)."""
    lse = torch.stack([p.lse for p in parts])
    total = torch.logsumexp(lse, dim=0)
    # An all-empty row has total -inf; weight 0 keeps it finite (zeros out).
    safe_total = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    weights = torch.exp(lse - safe_total).nan_to_num(0.0)
    out = sum(w.unsqueeze(-1) * p.out for w, p in zip(weights, parts, strict=True))
    return Partial(out=out, lse=total)


def masked_partial(
    logits: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor | None = None,
    log_weight: torch.Tensor | None = None,
) -> Partial:
    """Softmax over the last dim of ``logits`` [..., N] restricted to ``keep``, each entry
    carrying multiplicity ``exp(log_weight)``; ``values`` [..., N, d] broadcastable."""
    logits = logits.float()
    # With log_weight, entry j stands for exp(log_weight_j) tokens whose mean value is
    # values_j (the estimation zone: |c| copies of the centroid carrying V_c / |c|).
    weighted = logits if log_weight is None else logits + log_weight
    if keep is not None:
        weighted = weighted.masked_fill(~keep, NEG_INF)
    lse = torch.logsumexp(weighted, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(weighted - safe.unsqueeze(-1))
    return Partial(out=weighted_sum(probs, values.float()), lse=lse)


def weighted_sum(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_n probs[..., n] * values[..., n, :]`` -> [..., d], where ``values``' leading
    dims broadcast against ``probs``'. Dims along which values are shared are folded into
    the matmul's row dim: a broadcasting matmul would materialise the expanded values
    (gigabytes for 512 decode rows x 7K keys)."""
    batch = probs.shape[:-1]
    tokens, dim = values.shape[-2:]
    value_batch = (1,) * (len(batch) - (values.dim() - 2)) + tuple(values.shape[:-2])
    shared = [
        i for i, (p, v) in enumerate(zip(batch, value_batch, strict=True)) if v == 1 and p != 1
    ]
    kept = [i for i in range(len(batch)) if i not in shared]
    kept_shape = [batch[i] for i in kept]
    shared_shape = [batch[i] for i in shared]
    rows = probs.permute(*kept, *shared, len(batch)).reshape(*kept_shape, -1, tokens)
    table = values.reshape(*value_batch, tokens, dim)
    table = table.reshape(*[value_batch[i] for i in kept], tokens, dim)
    out = (rows @ table).reshape(*kept_shape, *shared_shape, dim)
    inverse = [0] * len(batch)
    for position, axis in enumerate(kept + shared):
        inverse[axis] = position
    return out.permute(*inverse, len(batch))


def dense_partial(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None = None,
) -> Partial:
    """Exact attention of query [P, H, G, d] over keys/values [H, T, d] (or [P, H, T, d]),
    optionally restricted per query row to ``keep`` [P, T]."""
    keys_t = keys.float().transpose(-1, -2)
    if keys.dim() == 3:
        keys_t = keys_t.unsqueeze(0)  # shared by all P queries
    logits = query.float() @ keys_t
    keep = None if keep is None else keep[:, None, None, :]
    return masked_partial(logits * scale, values.float().unsqueeze(-3), keep=keep)


def cluster_logits(query: torch.Tensor, index: WaveIndex, scale: float) -> torch.Tensor:
    """[P, H, G, C] scaled q.c for every query head and cluster (-inf for empty clusters)."""
    logits = (query.float() @ index.centroids.transpose(1, 2).unsqueeze(0)) * scale
    return logits.masked_fill((index.sizes == 0)[None, :, None, :], NEG_INF)


def choose_clusters(
    logits: torch.Tensor, budget: DecodeBudget
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval ids [P, H, R] and estimation ids [P, H, E], best first, from cluster logits
    [P, H, G, C]. Empty clusters (logit -inf) rank last; callers keep the budget within the
    non-empty count or accept that empty clusters contribute nothing."""
    rank = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=2)
    rank = rank.masked_fill(torch.isinf(logits[:, :, 0]), -1.0)
    chosen = rank.topk(budget.retrieval_clusters + budget.estimation_clusters, dim=-1).indices
    return chosen[..., : budget.retrieval_clusters], chosen[..., budget.retrieval_clusters :]


def retrieved_rows(
    index: WaveIndex, retrieval_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted-row numbers of the chosen clusters, packed: rows [P, H, L] int64 and a validity
    mask [P, H, L], L = the most rows any (query, head) chose."""
    offsets = index.offsets.unsqueeze(0).expand(retrieval_ids.shape[0], -1, -1)
    starts = offsets.gather(-1, retrieval_ids)
    sizes = offsets.gather(-1, retrieval_ids + 1) - starts  # [P, H, R]
    ends = sizes.cumsum(-1)
    width = max(int(ends[..., -1].max()) if ends.numel() else 0, 1)
    slots = torch.arange(width, device=sizes.device).expand(*ends.shape[:-1], -1).contiguous()
    run = torch.searchsorted(ends.contiguous(), slots, right=True)  # which cluster a slot is
    valid = run < sizes.shape[-1]
    run = run.clamp(max=sizes.shape[-1] - 1)
    rows = starts.gather(-1, run) + slots - (ends - sizes).gather(-1, run)
    return rows.where(valid, torch.zeros_like(rows)), valid


def retrieval_partial(
    query: torch.Tensor, index: WaveIndex, retrieval_ids: torch.Tensor, scale: float
) -> Partial:
    """Exact attention of query [P, H, G, d] over the rows of the chosen clusters only
    (gathered, so the cost follows the budget, not the context)."""
    if retrieval_ids.shape[-1] == index.num_clusters:
        # Every cluster: all rows, in stored order, shared by the P queries (no gather).
        return dense_partial(query, index.keys, index.values, scale)
    rows, valid = retrieved_rows(index, retrieval_ids)
    heads = torch.arange(index.keys.shape[0], device=rows.device)[None, :, None]
    keys = index.keys[heads, rows].float()  # [P, H, L, d]
    values = index.values[heads, rows].float()
    logits = (query.float() @ keys.transpose(-1, -2)) * scale  # [P, H, G, L]
    return masked_partial(logits, values.unsqueeze(2), keep=valid.unsqueeze(2))


@dataclass
class IndexAttention:
    """The index's two partials and the bound's ingredients, all [P, H, G]."""

    retrieval: Partial
    estimation: Partial
    estimation_low_lse: torch.Tensor  # log lower bound of the estimated zone's true mass
    estimation_error_lse: torch.Tensor  # log upper bound of sum_j |w_j - w^_j| over it
    skipped_high_lse: torch.Tensor  # log upper bound of the skipped clusters' mass
    retrieval_ids: torch.Tensor  # [P, H, R]
    estimation_ids: torch.Tensor  # [P, H, E]

    def weight_error_bound(self, exact_lse: torch.Tensor) -> torch.Tensor:
        """Upper bound on sum_j |p_j - p^_j| given the log mass of every exactly computed
        token (steady + retrieval), clipped to 2 (the L1 distance of two distributions)."""
        low = torch.logaddexp(exact_lse, self.estimation_low_lse)
        error = torch.logaddexp(self.estimation_error_lse, self.skipped_high_lse)
        return (math.log(2.0) + error - low).exp().clamp(max=2.0)


def zone_of_clusters(
    retrieval_ids: torch.Tensor, estimation_ids: torch.Tensor, clusters: int
) -> torch.Tensor:
    """[P, H, C] int8: 2 retrieval, 1 estimation, 0 skipped."""
    zone = torch.zeros(
        *retrieval_ids.shape[:-1], clusters, dtype=torch.int8, device=retrieval_ids.device
    )
    zone.scatter_(-1, estimation_ids, 1)
    zone.scatter_(-1, retrieval_ids, 2)
    return zone


def index_attention(
    query: torch.Tensor, index: WaveIndex, budget: DecodeBudget, scale: float
) -> IndexAttention:
    """Retrieval and estimation partials of query [P, H, G, d] over one layer's index."""
    logits = cluster_logits(query, index, scale)  # [P, H, G, C]
    retrieval_ids, estimation_ids = choose_clusters(logits, budget)
    zone = zone_of_clusters(retrieval_ids, estimation_ids, index.num_clusters)
    nonempty = (index.sizes > 0).unsqueeze(0)  # [1, H, C]
    retrieval = retrieval_partial(query, index, retrieval_ids, scale)
    # Estimation: centroid logits with multiplicity |c|; value of an entry = mean value.
    log_size = index.sizes.clamp(min=1).float().log()[None, :, None, :]
    estimated = ((zone == 1) & nonempty).unsqueeze(2)
    mean_values = index.value_sums / index.sizes.clamp(min=1).unsqueeze(-1)
    estimation = masked_partial(
        logits, mean_values.unsqueeze(0).unsqueeze(2), keep=estimated, log_weight=log_size
    )
    # Bound ingredients: a_c = scale * ||q|| * r_c per query head and cluster.
    slack = (query.float().norm(dim=-1, keepdim=True) * scale) * index.radii[None, :, None, :]
    base = (logits + log_size).masked_fill(~nonempty.unsqueeze(2), NEG_INF)
    skipped = ((zone == 0) & nonempty).unsqueeze(2)
    return IndexAttention(
        retrieval=retrieval,
        estimation=estimation,
        estimation_low_lse=torch.logsumexp((base - slack).masked_fill(~estimated, NEG_INF), -1),
        estimation_error_lse=torch.logsumexp(
            (base + torch.log(torch.expm1(slack).clamp(min=1e-30))).masked_fill(
                ~estimated, NEG_INF
            ),
            -1,
        ),
        skipped_high_lse=torch.logsumexp((base + slack).masked_fill(~skipped, NEG_INF), -1),
        retrieval_ids=retrieval_ids,
        estimation_ids=estimation_ids,
    )


@dataclass
class DecodeResult:
    out: torch.Tensor  # [P, H, G, d] float32
    weight_error_bound: torch.Tensor  # [P, H, G]
    output_error_bound: torch.Tensor  # [P, H, G]
    parts: IndexAttention


def retroinfer_decode(
    query: torch.Tensor,
    index: WaveIndex,
    steady_keys: torch.Tensor,
    steady_values: torch.Tensor,
    budget: DecodeBudget,
    scale: float | None = None,
    steady_keep: torch.Tensor | None = None,
) -> DecodeResult:
    """One decode step: steady zone exact ([H, S, d] or [P, H, S, d]), the index's retrieval
    and estimation zones, merged by log-sum-exp. query [P, H, G, d]. ``steady_keep`` [P, S]
    (optional) restricts which steady rows each query sees (teacher-forced decoding of
    several positions at once: generated tokens are causal among themselves)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    steady = dense_partial(query, steady_keys, steady_values, scale, keep=steady_keep)
    parts = index_attention(query, index, budget, scale)
    exact = merge_partials(steady, parts.retrieval)
    merged = merge_partials(exact, parts.estimation)
    weight_bound = parts.weight_error_bound(exact.lse)
    value_norm = torch.maximum(
        index.value_norm_max,
        steady_values.float()
        .norm(dim=-1)
        .amax(dim=-1)
        .reshape(-1, steady_values.shape[-3])
        .amax(0),
    )
    return DecodeResult(
        out=merged.out,
        weight_error_bound=weight_bound,
        output_error_bound=weight_bound * value_norm[None, :, None],
        parts=parts,
    )
