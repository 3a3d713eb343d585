"""MMInference's permutations (arXiv 2504.16083, section 3, "Permutation").

A permutation ``perm`` (int64 ``[N]``) lists, for each new slot, the token it holds:
``permuted = tokens[perm]``; ``inverse_permutation(perm)`` undoes it. Attention is invariant
under reordering keys, and rows are independent, so computing attention on permuted Q/K/V
with the mask evaluated on the tokens' *original* positions, then applying the inverse to the
output, gives exactly the unpermuted result. What changes is the layout: which kept pairs
fall into the same tile.

- ``grid_permutation``: inside the vision span, order tokens phase-major (view the span as
  ``[frames, stride]`` and transpose), so each grid line becomes one contiguous run and a
  grid head becomes a few dense tiles. Tokens after the last whole frame keep their order.
- ``modality_permutation``: group tokens by modality, stable inside each group (the paper's
  Q-boundary / 2D-boundary heads: each (query modality, key modality) region becomes a
  contiguous rectangle).
"""

from __future__ import annotations

import torch


def grid_permutation(num_tokens: int, vision_start: int, vision_end: int,
                     stride: int) -> torch.Tensor:
    """Int64 ``[num_tokens]``: identity outside the span, phase-major inside its whole frames."""
    if not 0 <= vision_start <= vision_end <= num_tokens or stride < 1:
        raise ValueError("need 0 <= vision_start <= vision_end <= num_tokens and stride >= 1")
    perm = torch.arange(num_tokens)
    frames = (vision_end - vision_start) // stride
    whole_end = vision_start + frames * stride
    span = torch.arange(vision_start, whole_end).view(frames, stride)
    perm[vision_start:whole_end] = span.t().reshape(-1)
    return perm


def modality_permutation(modality_ids: torch.Tensor) -> torch.Tensor:
    """Int64 ``[N]``: tokens grouped by ascending modality id, original order kept inside."""
    return torch.sort(modality_ids, stable=True).indices


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Int64 ``[N]`` with ``inverse[perm[i]] = i``."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return inverse


def permuted_tile_mask(keep: torch.Tensor, perm: torch.Tensor, tile: int) -> torch.Tensor:
    """Bool ``[H, ceil(N/tile), ceil(N/tile)]``: which ``tile x tile`` tiles of the permuted
    layout hold a kept pair. keep: bool ``[H, N, N]`` in token order (small N only: tests,
    benchmarks of synthetic attention)."""
    permuted = keep[:, perm][:, :, perm]
    num_heads, num_tokens, _ = permuted.shape
    padded_len = -(-num_tokens // tile) * tile
    pad = padded_len - num_tokens
    padded = torch.nn.functional.pad(permuted, (0, pad, 0, pad))
    blocks = padded_len // tile
    return padded.view(num_heads, blocks, tile, blocks, tile).any(dim=4).any(dim=2)
