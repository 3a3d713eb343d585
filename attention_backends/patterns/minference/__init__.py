"""MInference (arXiv 2407.02490): per-head dynamic sparse prefill. See README.md."""

from attention_backends.patterns.minference.block_sparse import BlockSparseHead
from attention_backends.patterns.minference.heads import (
    HEAD_PATTERNS,
    HeadPattern,
    LayerHeadPatterns,
    make_head_pattern,
)
from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk
from attention_backends.patterns.minference.static import AShapeHead, DenseHead, TriangleHead
from attention_backends.patterns.minference.vertical_slash import VerticalSlashHead

__all__ = [
    "AShapeHead",
    "BlockSparseHead",
    "DenseHead",
    "HEAD_PATTERNS",
    "HeadPattern",
    "HeadsIndex",
    "LayerHeadPatterns",
    "SequenceChunk",
    "TriangleHead",
    "VerticalSlashHead",
    "make_head_pattern",
]
