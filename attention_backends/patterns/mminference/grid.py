"""MMInference's grid head (arXiv 2504.16083, section 3, "Grid pattern").

Video tokens come as frames of a fixed ``stride`` tokens starting at ``vision_start``; a grid
head attends along lines at that stride. Query ``q`` keeps key ``k`` (causal) iff

    k < sink_tokens  or  q - k < window_tokens            (sink columns, local band)
    or  k in grid(phase_k)                                  (vertical lines)
    or  q in grid(phase_q)                                  (horizontal lines: whole rows)
    or  q >= vision_end                                     (the trailing text rows)

with ``grid(phase) = {vision_start + phase + j * stride : j >= 0} ∩ [vision_start, vision_end)``.
This is the mask of the paper's figure and of its released reference, expressed in the same
four sets as every MInference pattern (``minference/index.py``). The lines are spread over the
whole span, so in token order every key block holds a grid column: ``permutation.py`` reorders
the span phase-major, which turns each line into one contiguous run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk


def grid_positions(vision_start: int, vision_end: int, stride: int, phase: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Int64 positions of one grid line inside ``[vision_start, vision_end)`` (may be empty)."""
    return torch.arange(vision_start + phase, max(vision_end, vision_start + phase), stride,
                        device=device)


@dataclass(frozen=True)
class GridHead:
    vision_start: int
    vision_end: int
    stride: int
    phase_q: int = 0
    phase_k: int = 0
    sink_tokens: int = 64
    window_tokens: int = 256
    name: str = "grid"

    def __post_init__(self) -> None:
        if not 0 <= self.vision_start <= self.vision_end:
            raise ValueError("grid needs 0 <= vision_start <= vision_end")
        phases_ok = 0 <= self.phase_q < self.stride and 0 <= self.phase_k < self.stride
        if self.stride < 1 or not phases_ok:
            raise ValueError("grid needs stride >= 1 and phases in [0, stride)")
        if self.window_tokens < 1:
            raise ValueError("grid needs window_tokens >= 1 (a row keeps itself)")

    def params(self) -> dict:
        return {"vision_start": self.vision_start, "vision_end": self.vision_end,
                "stride": self.stride, "phase_q": self.phase_q, "phase_k": self.phase_k,
                "sink_tokens": self.sink_tokens, "window_tokens": self.window_tokens}

    def build(self, chunk: SequenceChunk, heads: list[int], block_size: int) -> HeadsIndex:
        num_tokens = chunk.num_tokens
        end = min(self.vision_end, num_tokens)
        index = HeadsIndex.empty(len(heads), num_tokens, block_size, chunk.device)
        index.columns[:, : self.sink_tokens] = True
        index.diagonals[:, : self.window_tokens] = True
        index.columns[:, grid_positions(self.vision_start, end, self.stride, self.phase_k,
                                      chunk.device)] = True
        index.full_rows[:, grid_positions(self.vision_start, end, self.stride, self.phase_q,
                                        chunk.device)] = True
        index.full_rows[:, self.vision_end :] = True
        return index
