"""Patterns whose index does not depend on the input: dense, A-shape, TriangleMix's triangle.

A-shape (MInference's name for StreamingLLM's shape, arXiv 2407.02490 section 3): sink
columns ``k < sink_tokens`` plus the local band ``q - k < window_tokens``. TriangleMix
(arXiv 2507.21526) adds full rows for the prompt's last ``last_q_tokens`` queries: the same
function as ``patterns/triangle.py`` (tested equal), here as one more per-head pattern so a
layer can mix it with dynamic heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk


@dataclass(frozen=True)
class DenseHead:
    """Every causal pair: the whole sequence as full rows."""

    name: str = "dense"

    def params(self) -> dict:
        return {}

    def build(self, chunk: SequenceChunk, heads: list[int], block_size: int) -> HeadsIndex:
        index = HeadsIndex.empty(len(heads), chunk.num_tokens, block_size, chunk.device)
        index.full_rows[:] = True
        return index


@dataclass(frozen=True)
class AShapeHead:
    """Sinks plus a local window."""

    sink_tokens: int = 64
    window_tokens: int = 512
    name: str = "a_shape"

    def __post_init__(self) -> None:
        if self.window_tokens < 1 or self.sink_tokens < 0:
            raise ValueError("a_shape needs window_tokens >= 1 (a row keeps itself), sinks >= 0")

    def params(self) -> dict:
        return {"sink_tokens": self.sink_tokens, "window_tokens": self.window_tokens}

    def build(self, chunk: SequenceChunk, heads: list[int], block_size: int) -> HeadsIndex:
        index = HeadsIndex.empty(len(heads), chunk.num_tokens, block_size, chunk.device)
        index.columns[:, : self.sink_tokens] = True
        index.diagonals[:, : self.window_tokens] = True
        return index


@dataclass(frozen=True)
class TriangleHead:
    """A-shape plus full rows for the prompt's last ``last_q_tokens`` queries. The rows are
    decided by the whole prompt's length, so a chunked prefill gives the single-shot index."""

    sink_tokens: int = 8
    window_tokens: int = 512
    last_q_tokens: int = 128
    name: str = "triangle"

    def __post_init__(self) -> None:
        if self.window_tokens < 1 or self.sink_tokens < 0 or self.last_q_tokens < 0:
            raise ValueError("triangle needs window_tokens >= 1, sinks and last rows >= 0")

    def params(self) -> dict:
        return {"sink_tokens": self.sink_tokens, "window_tokens": self.window_tokens,
                "last_q_tokens": self.last_q_tokens}

    def build(self, chunk: SequenceChunk, heads: list[int], block_size: int) -> HeadsIndex:
        index = AShapeHead(self.sink_tokens, self.window_tokens).build(chunk, heads, block_size)
        index.full_rows[:, max(chunk.prompt_len - self.last_q_tokens, 0) :] = True
        return index
