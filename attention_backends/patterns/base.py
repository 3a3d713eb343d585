"""What every sparse-prefill pattern answers, whatever its shape.

A pattern is a pure description of which (query, key) pairs of one sequence are kept. It
knows nothing about heads, dtypes or devices. Positions are absolute token positions in the
sequence (0-based); ``prompt_len`` is the length of the whole prompt, which decides rows that
depend on the end of the prompt (TriangleMix's last-q rows) also when a chunk of the prompt
is prefilled at a time.

Two views of the same function:

- ``token_mask`` is the definition, per token (this is what the kernels compute);
- ``key_ranges`` lists, for a run of consecutive query rows, the key intervals that can hold
  a kept key, so a kernel gathers only those (a superset of the kept keys, never a subset);
- ``block_mask`` is the block-level summary (which key blocks each query block touches) used
  for reporting kept fractions and for planning work.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AttentionPattern(Protocol):
    """The interface of ``DensePattern`` and ``TrianglePattern``."""

    name: str
    block_size: int

    @property
    def is_dense(self) -> bool:
        """True when the pattern keeps every causal pair (plain causal attention)."""
        ...

    def token_mask(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor, prompt_len: int
    ) -> torch.Tensor:
        """Bool ``[num_queries, num_keys]``: True where the query attends the key."""
        ...

    def key_ranges(
        self, first_query_pos: int, last_query_pos: int, prompt_len: int
    ) -> list[tuple[int, int]]:
        """Sorted, disjoint half-open key intervals covering every key kept by any query
        row in ``[first_query_pos, last_query_pos]``."""
        ...


def causal_block_count(num_tokens: int, block_size: int) -> int:
    """Number of (query block, key block) pairs on or below the diagonal."""
    num_blocks = -(-num_tokens // block_size)
    return num_blocks * (num_blocks + 1) // 2


def block_mask(
    pattern: AttentionPattern, num_tokens: int, block_size: int | None = None
) -> torch.Tensor:
    """Bool ``[num_query_blocks, num_key_blocks]``: True where any query of the query block
    keeps any key of the key block, for a fresh prefill of a ``num_tokens`` prompt.

    Built from ``key_ranges`` (O(num_blocks) intervals per query block), never from a
    token-level ``num_tokens x num_tokens`` mask, so it is cheap at 128K tokens. The ranges
    are a superset of kept keys; for the dense and triangle patterns every key block they
    touch holds at least one kept pair, so the count is exact for them.
    """
    size = block_size or pattern.block_size
    num_blocks = -(-num_tokens // size)
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    for query_block in range(num_blocks):
        first = query_block * size
        last = min(num_tokens, first + size) - 1
        for lo, hi in pattern.key_ranges(first, last, num_tokens):
            mask[query_block, lo // size : (hi - 1) // size + 1] = True
    return mask


def kept_block_fraction(
    pattern: AttentionPattern, num_tokens: int, block_size: int | None = None
) -> float:
    """Kept blocks over causal blocks (diagonal blocks count as whole blocks)."""
    size = block_size or pattern.block_size
    kept = int(block_mask(pattern, num_tokens, size).sum())
    return kept / causal_block_count(num_tokens, size)
