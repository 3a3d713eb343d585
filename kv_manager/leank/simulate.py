"""Serving-faithful simulation of LeanK in one forward pass, for training and fidelity.

In serving, the prompt is prefilled densely (its K/V come from unpruned hidden states) and
only decode reads the pruned cache. Masking keys at every position of a forward pass
instead compounds the error through all layers and positions, which is much harsher than
serving. So we run two streams over the same tokens, as batch rows:

- row 0, the dense stream: plain causal attention; its K/V are "the cache".
- row 1, the decode stream: position t is token t decoded right after a dense prefill of
  tokens < t: its query scores the dense stream's keys j < t on the kept channels only, and
  its own key (from its own hidden state) for j = t, likewise pruned; values are the dense
  stream's for j < t and its own for j = t.

Every position of row 1 is then exactly a first decode step after a dense prompt of
length t, teacher-forced, all in one pass (``test_leank_simulate.py`` checks this against the
per-position definition in ``apply.masked_dense_attention``).
"""

from __future__ import annotations

import torch


def decode_after_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   factors: torch.Tensor, scaling: float) -> torch.Tensor:
    """query [2, q_heads, T, d], key/value [2, kv_heads, T, d] (post-RoPE; row 0 dense,
    row 1 decode), factors [kv_heads, d] (1 kept, 0 dropped; soft values in training)
    -> [2, T, q_heads, d] (the layout HF attention functions return)."""
    _, q_heads, tokens, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    dense = torch.nn.functional.scaled_dot_product_attention(
        query[:1], key[:1], value[:1], is_causal=True, scale=scaling, enable_gqa=True)[0]
    diagonal = torch.eye(tokens, dtype=torch.bool, device=query.device)
    future = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).triu(1)
    decoded = []
    # One KV head at a time keeps the [group, T, T] score tensor small at long T.
    for head in range(kv_heads):
        q = query[1, head * group: (head + 1) * group]
        cached_keys = key[0, head] * factors[head]
        own_keys = key[1, head] * factors[head]
        scores = q @ cached_keys.transpose(0, 1) * scaling
        own_scores = (q * own_keys).sum(-1) * scaling
        scores = torch.where(diagonal, own_scores.unsqueeze(-1), scores)
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        from_cache = probs.masked_fill(diagonal, 0.0) @ value[0, head]
        from_self = probs.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * value[1, head]
        decoded.append(from_cache + from_self)
    out = torch.stack([dense, torch.cat(decoded)])
    return out.transpose(1, 2).contiguous()
