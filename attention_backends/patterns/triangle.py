"""TriangleMix's triangle pattern (arXiv 2507.21526): streaming (sinks + local window) for
every query, plus full causal rows for the last ``last_q_tokens`` queries of the prompt. The
"middle" query-key region is dropped.

Defined per token, as in the paper's official kernels (MInference ``streaming_kernel.py``
masks each element by its distance ``q - k``; the last rows are exact token rows): query at
absolute position ``q`` keeps key ``k`` iff

    k <= q  and  (k < sink_tokens  or  q - k < window_tokens  or  q >= prompt_len - last_q_tokens)

``block_size`` is the granularity of the block summary (kept fraction of blocks, planning),
not part of the definition: the reference and the GPU kernel compute exactly the function
above whatever tile sizes they use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The paper's defaults (official code `minference/models_patch.py`, `tri_mix`):
# n_init=8, n_local=512, n_last=128, dense layers below starting_layer=16 (Llama-3.1-8B).
PAPER_SINK_TOKENS = 8
PAPER_WINDOW_TOKENS = 512
PAPER_LAST_Q_TOKENS = 128
PAPER_DENSE_FIRST_LAYERS = 16


@dataclass(frozen=True)
class TrianglePattern:
    """Sinks + local window for every query; full causal rows for the last prompt queries."""

    sink_tokens: int = PAPER_SINK_TOKENS
    window_tokens: int = PAPER_WINDOW_TOKENS
    last_q_tokens: int = PAPER_LAST_Q_TOKENS
    block_size: int = 64
    name: str = "triangle"

    def __post_init__(self) -> None:
        if self.window_tokens < 1:
            raise ValueError("window_tokens must be >= 1 (every query keeps itself)")
        if self.sink_tokens < 0 or self.last_q_tokens < 0:
            raise ValueError("sink_tokens and last_q_tokens must be >= 0")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")

    @property
    def is_dense(self) -> bool:
        return False

    def last_rows_start(self, prompt_len: int) -> int:
        """First absolute position whose row is a full causal ("last q") row."""
        return max(prompt_len - self.last_q_tokens, 0)

    def token_mask(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor, prompt_len: int
    ) -> torch.Tensor:
        """Bool ``[Q, K]`` from int positions ``[Q]`` and ``[K]`` (the definition above)."""
        query = query_positions[:, None]
        key = key_positions[None, :]
        causal = key <= query
        streaming = (key < self.sink_tokens) | (query - key < self.window_tokens)
        last_rows = query >= self.last_rows_start(prompt_len)
        return causal & (streaming | last_rows)

    def key_ranges(
        self, first_query_pos: int, last_query_pos: int, prompt_len: int
    ) -> list[tuple[int, int]]:
        """Key intervals for query rows ``[first_query_pos, last_query_pos]``.

        A run that contains a last-q row needs every causal key; otherwise the sinks that
        lie before the first row's window, then the window span from the first row's window
        start to the last row.
        """
        end = last_query_pos + 1
        if last_query_pos >= self.last_rows_start(prompt_len):
            return [(0, end)]
        window_start = max(first_query_pos - self.window_tokens + 1, 0)
        sink_end = min(self.sink_tokens, window_start)
        ranges = [(0, sink_end)] if sink_end > 0 else []
        ranges.append((window_start, end))
        return ranges

    def kept_pairs_per_row(self, num_tokens: int) -> torch.Tensor:
        """Int64 ``[num_tokens]``: kept keys of each row for a fresh prefill of that length."""
        query = torch.arange(num_tokens, dtype=torch.int64)
        window = torch.clamp(query + 1, max=self.window_tokens)
        # sinks that lie before the window: keys k < sink with k <= q - window
        sinks_outside_window = torch.clamp(
            torch.minimum(query - self.window_tokens + 1, torch.tensor(self.sink_tokens)), min=0
        )
        kept = window + sinks_outside_window
        last = query >= self.last_rows_start(num_tokens)
        return torch.where(last, query + 1, kept)

    def kept_fraction(self, num_tokens: int) -> float:
        """Kept (query, key) pairs over causal pairs, fresh prefill of ``num_tokens``."""
        causal_pairs = num_tokens * (num_tokens + 1) / 2
        return float(self.kept_pairs_per_row(num_tokens).sum()) / causal_pairs
