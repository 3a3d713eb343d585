"""Turn channel importance into an aligned mask (the paper's sparsity + alignment constraint).

Each head keeps a multiple of ``align`` channels (so a kernel tile never straddles a
half-used vector) and the model as a whole keeps ``(1 - sparsity)`` of its K channels,
rounded to whole aligned groups. Among all masks meeting both, we keep the one maximising the
summed importance: sort each head's scores, cut them into groups of ``align``; a head's group
values never increase, so taking the globally best groups always takes a prefix of each head.
A head may end with zero groups: it is fully pruned.
"""

from __future__ import annotations

import torch


def total_kept_groups(num_channels: int, sparsity: float, align: int) -> int:
    """Aligned groups kept across the model for a target sparsity (nearest whole group)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(round((1.0 - sparsity) * num_channels / align))


def aligned_head_budgets(importance: torch.Tensor, sparsity: float, align: int) -> torch.Tensor:
    """importance: float [layers, kv_heads, head_dim], >= 0 -> int64 [layers, kv_heads]:
    channels kept per head, each a multiple of ``align``, summing to the aligned target."""
    layers, heads, head_dim = importance.shape
    if head_dim % align:
        raise ValueError(f"head_dim {head_dim} is not a multiple of align {align}")
    groups_per_head = head_dim // align
    ranked = importance.float().sort(dim=2, descending=True).values
    group_value = ranked.view(layers, heads, groups_per_head, align).sum(dim=3).flatten()
    keep_groups = total_kept_groups(importance.numel(), sparsity, align)
    # Stable ordering: ties go to the earlier head, and to a head's earlier group, so the
    # per-head prefix property holds even with equal values.
    order = torch.argsort(-group_value, stable=True)[:keep_groups]
    chosen = torch.zeros_like(group_value, dtype=torch.bool)
    chosen[order] = True
    return chosen.view(layers, heads, groups_per_head).sum(dim=2) * align


def topk_keep(importance: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """bool [layers, kv_heads, head_dim]: each head's ``budgets`` highest-scoring channels."""
    rank = importance.float().argsort(dim=2, descending=True, stable=True).argsort(dim=2)
    return rank < budgets.unsqueeze(2)


def layer_uniform_head_budgets(importance: torch.Tensor, sparsity: float,
                               align: int) -> torch.Tensor:
    """Like ``aligned_head_budgets``, but every layer keeps the same number of channels, so
    a packed K row has one width across layers (vLLM wants one page size per KV cache
    group). Heads within a layer still compete: the layer's best groups win."""
    budgets = [aligned_head_budgets(importance[layer: layer + 1], sparsity, align)
               for layer in range(importance.shape[0])]
    return torch.cat(budgets)
