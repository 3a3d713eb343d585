"""The per-head patterns by name, and one layer's heads as a pattern the backends can run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from attention_backends.patterns.minference.block_sparse import BlockSparseHead
from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk
from attention_backends.patterns.minference.static import AShapeHead, DenseHead, TriangleHead
from attention_backends.patterns.minference.vertical_slash import VerticalSlashHead
from attention_backends.patterns.mminference.grid import GridHead


class HeadPattern(Protocol):
    name: str

    def params(self) -> dict:
        """The constructor's keyword arguments (what a config file stores)."""
        ...

    def build(self, chunk: SequenceChunk, heads: list[int], block_size: int) -> HeadsIndex:
        """The index of the given query heads over ``chunk.num_tokens`` tokens."""
        ...


HEAD_PATTERNS: dict[str, type] = {
    cls.name: cls
    for cls in (DenseHead, AShapeHead, TriangleHead, VerticalSlashHead, BlockSparseHead, GridHead)
}


def make_head_pattern(name: str, **params: Any) -> HeadPattern:
    try:
        return HEAD_PATTERNS[name](**params)
    except KeyError:
        raise ValueError(f"unknown head pattern {name!r}; known: {sorted(HEAD_PATTERNS)}") from None


@dataclass(frozen=True)
class LayerHeadPatterns:
    """One pattern per query head of a layer. Duck-types the parts of ``AttentionPattern``
    that the vLLM glue reads (``name``, ``is_dense``); ``kernels.sparse_prefill`` routes it
    to the per-head path."""

    heads: tuple[HeadPattern, ...]
    block_size: int = 64
    name: str = "per_head"

    @property
    def is_dense(self) -> bool:
        return all(isinstance(head, DenseHead) for head in self.heads)

    def build_index(self, chunk: SequenceChunk) -> HeadsIndex:
        """Every head's index; heads with equal patterns are built together (one matmul)."""
        if int(chunk.query.shape[1]) != len(self.heads):
            raise ValueError(f"{len(self.heads)} head patterns for {chunk.query.shape[1]} heads")
        index = HeadsIndex.empty(len(self.heads), chunk.num_tokens, self.block_size, chunk.device)
        groups: dict[HeadPattern, list[int]] = {}
        for head, pattern in enumerate(self.heads):
            groups.setdefault(pattern, []).append(head)
        for pattern, heads in groups.items():
            part = pattern.build(chunk, heads, self.block_size)
            where = torch.tensor(heads, device=chunk.device)
            for name in ("columns", "diagonals", "full_rows", "blocks"):
                getattr(index, name)[where] = getattr(part, name)
        return index
