"""Dense causal attention as a pattern: every query attends every earlier key and itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DensePattern:
    """Plain causal attention. ``block_size`` only sets the reporting/planning granularity."""

    block_size: int = 64
    name: str = "dense"

    @property
    def is_dense(self) -> bool:
        return True

    def token_mask(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor, prompt_len: int
    ) -> torch.Tensor:
        """Bool ``[Q, K]``: ``key <= query``. ``prompt_len`` is unused (kept for the interface)."""
        return key_positions[None, :] <= query_positions[:, None]

    def key_ranges(
        self, first_query_pos: int, last_query_pos: int, prompt_len: int
    ) -> list[tuple[int, int]]:
        """One interval: every key up to the last query row."""
        return [(0, last_query_pos + 1)]

    def kept_fraction(self, num_tokens: int) -> float:
        """Kept (query, key) pairs over causal pairs for a fresh prefill: always 1."""
        return 1.0
