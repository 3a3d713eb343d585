"""Applying a LeanK mask in plain torch: the CPU path and the reference for the kernels.

RoPE: the mask indexes post-RoPE channels, as the paper learns it (the cache stores rotated
keys, and q.k is a plain sum over channels after rotation, so any channel subset is exact;
rotation pairs need not be kept together). So the cache write prunes keys after RoPE, and
decode gathers the same post-RoPE channels of the query. The softmax scale stays
1/sqrt(head_dim) of the unpruned head: the trained mask was learned with it.
"""

from __future__ import annotations

import math

import torch

from kv_manager.leank.layout import LayerLayout


def prune_keys(keys: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """keys [tokens, kv_heads, head_dim] (post-RoPE) -> packed [tokens, k_width]."""
    return keys.flatten(1)[:, layout.flat_kept_index.to(keys.device)]


def live_values(values: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """values [tokens, kv_heads, head_dim] -> [tokens, live_heads, head_dim]."""
    return values[:, layout.live_heads]


def pruned_value_sum(values: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """values [tokens, kv_heads, head_dim] -> float32 [pruned_heads, head_dim]: the running
    sum that stands in for the V pages of fully pruned heads."""
    return values[:, layout.pruned_heads].float().sum(dim=0)


def masked_dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           keep: torch.Tensor, causal: bool) -> torch.Tensor:
    """The definition: dense attention with the dropped K channels zeroed.

    query [q_tokens, q_heads, head_dim], keys/values [kv_tokens, kv_heads, head_dim],
    keep bool [kv_heads, head_dim] -> [q_tokens, q_heads, head_dim] float32. With ``causal``
    the last query attends to the last key (decode = causal with q_tokens == 1).
    """
    q_heads, kv_heads = query.shape[1], keys.shape[1]
    group = q_heads // kv_heads
    masked_keys = keys.float() * keep.to(keys.device).unsqueeze(0)
    k = masked_keys.repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    q = query.float().transpose(0, 1)
    scores = q @ k.transpose(1, 2) / math.sqrt(query.shape[2])
    if causal:
        q_len, k_len = q.shape[1], k.shape[1]
        rows = torch.arange(q_len).unsqueeze(1) + (k_len - q_len)
        scores = scores.masked_fill(torch.arange(k_len).unsqueeze(0) > rows, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(0, 1)


def pruned_decode_attention(query: torch.Tensor, packed_keys: torch.Tensor,
                            values_live: torch.Tensor, value_sum: torch.Tensor,
                            layout: LayerLayout) -> torch.Tensor:
    """One sequence's decode step on the pruned cache, no dense K anywhere.

    query [q_heads, head_dim] (post-RoPE), packed_keys [tokens, k_width],
    values_live [tokens, live_heads, head_dim], value_sum float32 [pruned_heads, head_dim]
    -> float32 [q_heads, head_dim].
    """
    q_heads, head_dim = query.shape
    group = q_heads // layout.num_kv_heads
    tokens = packed_keys.shape[0]
    counts, offsets = layout.k_counts.tolist(), layout.k_offsets.tolist()
    v_slot, sum_slot = layout.v_slot.tolist(), layout.sum_slot.tolist()
    out = torch.empty(q_heads, head_dim, dtype=torch.float32, device=query.device)
    for q_head in range(q_heads):
        kv_head = q_head // group
        if counts[kv_head] == 0:
            # All scores are 0: softmax is uniform, the output is the mean of V.
            out[q_head] = value_sum[sum_slot[kv_head]] / tokens
            continue
        kept = torch.nonzero(layout.keep[kv_head]).flatten().to(query.device)
        k = packed_keys[:, offsets[kv_head]: offsets[kv_head] + counts[kv_head]].float()
        scores = k @ query[q_head, kept].float() / math.sqrt(head_dim)
        out[q_head] = scores.softmax(dim=0) @ values_live[:, v_slot[kv_head]].float()
    return out


def prefill_over_pruned_prefix(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               prefix_keys: torch.Tensor, prefix_values_live: torch.Tensor,
                               prefix_value_sum: torch.Tensor,
                               layout: LayerLayout,
                               key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence's prefill chunk: causal attention of this chunk's queries over its own
    full keys (prefill is dense, as in ``simulate``) and over the ``p`` earlier tokens that
    only the pruned cache still holds (an earlier chunk, or a prefix-cache hit).

    ``key_mask`` bool ``[q, p + q]`` (None: every causal key), a sparse prefill pattern's
    kept keys for these rows (TriangleMix's sinks, window and last rows): masked keys drop
    out of the softmax. A fully pruned head's prefix stays whole, one pseudo-key: its keys
    score 0 and only their block V sums are stored, so a partial set of them has no V to
    average (exact where the pattern keeps the whole prefix, e.g. last rows).

    query [q, q_heads, head_dim], keys/values [q, kv_heads, head_dim] (this chunk, post-RoPE),
    prefix_keys [p, k_width], prefix_values_live [p, live_heads, head_dim], prefix_value_sum
    float32 [pruned_heads, head_dim] (V summed over the p tokens) -> float32 [q, q_heads, d].
    A fully pruned head's p prefix scores are all 0, so they act as one key with score
    log(p) and value mean(V): exact, without V pages.
    """
    chunk, q_heads, head_dim = query.shape
    prefix = prefix_keys.shape[0]
    group = q_heads // layout.num_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    counts, offsets = layout.k_counts.tolist(), layout.k_offsets.tolist()
    v_slot, sum_slot = layout.v_slot.tolist(), layout.sum_slot.tolist()
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu(1)
    if key_mask is not None:
        future = future | ~key_mask[:, prefix:]
    out = torch.empty(chunk, q_heads, head_dim, dtype=torch.float32, device=query.device)
    for kv_head in range(layout.num_kv_heads):
        q = query[:, kv_head * group: (kv_head + 1) * group].float().transpose(0, 1)
        scores = (q @ keys[:, kv_head].float().T * scale).masked_fill(future, float("-inf"))
        vals = values[:, kv_head].float().expand(group, chunk, head_dim)
        if prefix and counts[kv_head]:
            kept = torch.nonzero(layout.keep[kv_head]).flatten().to(query.device)
            k = prefix_keys[:, offsets[kv_head]: offsets[kv_head] + counts[kv_head]].float()
            prefix_scores = q[..., kept] @ k.T * scale
            if key_mask is not None:
                prefix_scores = prefix_scores.masked_fill(~key_mask[:, :prefix], float("-inf"))
            scores = torch.cat([prefix_scores, scores], dim=-1)
            prefix_v = prefix_values_live[:, v_slot[kv_head]].float()
            vals = torch.cat([prefix_v.expand(group, prefix, head_dim), vals], dim=1)
        elif prefix:
            scores = torch.cat([scores.new_full((group, chunk, 1), math.log(prefix)), scores],
                               dim=-1)
            mean = (prefix_value_sum[sum_slot[kv_head]] / prefix).view(1, 1, head_dim)
            vals = torch.cat([mean.expand(group, 1, head_dim), vals], dim=1)
        out[:, kv_head * group: (kv_head + 1) * group] = (scores.softmax(-1) @ vals
                                                          ).transpose(0, 1)
    return out
