"""RetroInfer settings and the budgets derived from them.

Defaults follow the official code (microsoft/RetrievalAttention @ 6b1228c, read through the
research digest ``../shared/research/kv_manager.md`` sec. 2): 8192-token segments, 16 tokens
per cluster on average, 10 k-means iterations, a steady zone of the first 4 and last 64 prompt
tokens, retrieval of 1.8% and estimation of 23.2% of the clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WaveIndexConfig:
    segment_tokens: int = 8192
    tokens_per_cluster: int = 16
    kmeans_iterations: int = 10
    sink_tokens: int = 4
    recent_tokens: int = 64
    retrieval_fraction: float = 0.018
    estimation_fraction: float = 0.232
    # (ours) At 4-8K tokens 1.8% of the clusters is 4-8 clusters (64-128 tokens), too few to
    # copy a long-range passage (benchmarks/retroinfer_NOTES.md); the exact tier is at least
    # this many tokens' worth of clusters, at the index's average cluster size. 0: the paper's
    # pure fraction. At 128K, 1.8% is ~2.4K tokens, so a floor of <= 2K changes nothing there.
    min_exact_tokens: int = 0
    # Decode-time update (official code): every this many generated tokens leave the steady
    # zone and become one new segment of update_clusters clusters.
    update_tokens: int = 1024
    update_clusters: int = 64
    # Below this many indexed (middle) tokens the index costs more than it saves: the
    # official code keeps plain attention under 68 + 1024 prompt tokens.
    min_indexed_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.segment_tokens < self.tokens_per_cluster or self.tokens_per_cluster < 1:
            raise ValueError("need segment_tokens >= tokens_per_cluster >= 1")
        if not 0 <= self.retrieval_fraction + self.estimation_fraction <= 1:
            raise ValueError("retrieval + estimation fractions must lie in [0, 1]")
        if self.min_exact_tokens < 0:
            raise ValueError("min_exact_tokens must be >= 0")

    def indexed_tokens(self, prompt_tokens: int) -> int:
        """Tokens between the sink and the recent window: the ones the index covers."""
        return max(prompt_tokens - self.sink_tokens - self.recent_tokens, 0)

    def uses_index(self, prompt_tokens: int) -> bool:
        return self.indexed_tokens(prompt_tokens) >= self.min_indexed_tokens

    def segment_lengths(self, indexed_tokens: int) -> list[int]:
        """Near-equal segments, ``max(round(N / segment_tokens), 1)`` of them (official rule)."""
        count = max(round(indexed_tokens / self.segment_tokens), 1)
        base, extra = divmod(indexed_tokens, count)
        return [base + (1 if i < extra else 0) for i in range(count)]

    def clusters_per_segment(self, segment_length: int) -> int:
        return max(round(segment_length / self.tokens_per_cluster), 1)


@dataclass(frozen=True)
class DecodeBudget:
    """How many clusters a decode step reads exactly and how many it estimates."""

    retrieval_clusters: int
    estimation_clusters: int

    @classmethod
    def from_fractions(
        cls,
        clusters: int,
        retrieval_fraction: float,
        estimation_fraction: float,
        min_retrieval_clusters: int = 1,
    ) -> DecodeBudget:
        """Fractions of ``clusters``, rounded; at least ``min_retrieval_clusters`` (and 1)
        retrieved; the estimation count keeps its fraction, cut to the clusters left."""
        wanted = max(round(clusters * retrieval_fraction), min_retrieval_clusters, 1)
        retrieval = min(wanted, clusters)
        estimation = min(round(clusters * estimation_fraction), clusters - retrieval)
        return cls(retrieval, estimation)

    @classmethod
    def for_index(cls, clusters: int, indexed_tokens: int, config: WaveIndexConfig) -> DecodeBudget:
        """The configured budget for an index of ``clusters`` over ``indexed_tokens``: the
        fractions, with the exact tier raised to ``min_exact_tokens`` worth of clusters of
        the index's average size (rounded up). Which clusters a query picks varies in size,
        so the exact rows are ~min_exact_tokens, not a guarantee per query."""
        floor = 0
        if config.min_exact_tokens and indexed_tokens:
            floor = math.ceil(config.min_exact_tokens * clusters / indexed_tokens)
        return cls.from_fractions(
            clusters, config.retrieval_fraction, config.estimation_fraction, floor
        )

    @classmethod
    def default(cls, clusters: int, config: WaveIndexConfig) -> DecodeBudget:
        """``for_index`` assuming the configured average cluster size."""
        return cls.for_index(clusters, clusters * config.tokens_per_cluster, config)
