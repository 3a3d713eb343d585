"""Sparse-prefill attention patterns: which keys each query of a prompt attends.

``make_pattern("triangle", sink_tokens=8, ...)`` builds one from plain values (config files).
"""

from __future__ import annotations

from typing import Any

from attention_backends.patterns.base import (
    AttentionPattern,
    block_mask,
    causal_block_count,
    kept_block_fraction,
)
from attention_backends.patterns.dense import DensePattern
from attention_backends.patterns.triangle import (
    PAPER_DENSE_FIRST_LAYERS,
    PAPER_LAST_Q_TOKENS,
    PAPER_SINK_TOKENS,
    PAPER_WINDOW_TOKENS,
    TrianglePattern,
)

PATTERNS: dict[str, type] = {"dense": DensePattern, "triangle": TrianglePattern}


def make_pattern(name: str, **params: Any) -> AttentionPattern:
    """Build a pattern by name (``"dense"`` or ``"triangle"``) with keyword parameters."""
    try:
        pattern_class = PATTERNS[name]
    except KeyError:
        raise ValueError(f"unknown attention pattern {name!r}; known: {sorted(PATTERNS)}") from None
    return pattern_class(**params)


__all__ = [
    "AttentionPattern",
    "DensePattern",
    "TrianglePattern",
    "PATTERNS",
    "PAPER_DENSE_FIRST_LAYERS",
    "PAPER_LAST_Q_TOKENS",
    "PAPER_SINK_TOKENS",
    "PAPER_WINDOW_TOKENS",
    "block_mask",
    "causal_block_count",
    "kept_block_fraction",
    "make_pattern",
]
