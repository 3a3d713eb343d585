"""The offline per-head pattern search (MInference, arXiv 2407.02490, section 3.3,
"kernel-aware optimal sparse pattern search").

For every (layer, head), on local long texts: compute the head's dense attention, build each
candidate pattern's index *on the same input* (dynamic candidates estimate online, as they
will when serving: the search scores what the kernel will compute, not an oracle mask), and
score it by **recall**: the attention mass inside the candidate's mask, averaged over rows
``q >= recall_from_row`` (early rows keep nearly everything under any pattern). The highest
recall wins; a head whose best recall is below ``min_recall`` stays dense (MInference makes
every head sparse and relabels every winner vertical-slash; a 135M model at 4K tokens has
heads no candidate covers, and TriangleMix measured that SmolLM2's layers 15-21 need
long-range copying). Candidates should cost about the same per row, so recall alone decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from attention_backends.patterns.minference.block_sparse import BlockSparseHead
from attention_backends.patterns.minference.heads import HeadPattern, LayerHeadPatterns
from attention_backends.patterns.minference.index import SequenceChunk
from attention_backends.patterns.minference.static import AShapeHead, DenseHead
from attention_backends.patterns.minference.vertical_slash import VerticalSlashHead


def default_candidates(num_tokens: int, block_size: int = 64) -> list[HeadPattern]:
    """About 10% of a row's keys each at ``num_tokens`` (MInference's candidates at 30K
    keep 900 keys per row; ours scale with the searched length so costs stay comparable)."""
    budget = max(num_tokens // 10, 64)

    def vertical_slash(vertical: int) -> VerticalSlashHead:
        return VerticalSlashHead(vertical_size=vertical, slash_size=budget - vertical,
                                 sink_tokens=min(16, vertical),
                                 local_tokens=min(32, budget - vertical))

    return [
        AShapeHead(sink_tokens=budget // 8, window_tokens=budget - budget // 8),
        vertical_slash(budget // 8),
        vertical_slash(budget // 2),
        vertical_slash(budget - budget // 8),
        BlockSparseHead(top_k_blocks=max(budget // block_size, 2)),
    ]


def head_recalls(query: torch.Tensor, keys: torch.Tensor, scale: float,
                 candidates: Sequence[HeadPattern], block_size: int = 64,
                 recall_from_row: int = 0, heads_per_step: int = 3) -> torch.Tensor:
    """Float ``[len(candidates), Hq]``: mean attention mass kept per row (rows
    ``>= recall_from_row``) by each candidate, for one layer of one text.

    query ``[Hq, N, D]``, keys ``[Hkv, N, D]`` (post-RoPE, float32), a single-shot prefill.
    """
    num_heads, num_tokens, _ = query.shape
    group = num_heads // keys.shape[0]
    chunk = SequenceChunk(query.transpose(0, 1), torch.arange(num_tokens), keys.transpose(0, 1),
                          num_tokens, scale)
    rows = torch.arange(recall_from_row, num_tokens)
    recalls = torch.zeros(len(candidates), num_heads)
    for first in range(0, num_heads, heads_per_step):
        heads = list(range(first, min(first + heads_per_step, num_heads)))
        kv = torch.tensor([head // group for head in heads])
        scores = torch.matmul(query[heads][:, rows], keys[kv].transpose(1, 2)) * scale
        scores.masked_fill_(torch.arange(num_tokens)[None, :] > rows[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [h, rows, N]
        for c, candidate in enumerate(candidates):
            keep = candidate.build(chunk, heads, block_size).keep_mask(rows)
            recalls[c, heads] = (probs * keep).sum(dim=-1).mean(dim=-1)
    return recalls


@dataclass(frozen=True)
class SearchResult:
    layers: tuple[LayerHeadPatterns, ...]
    best_recall: list[list[float]]  # [layer][head] recall of the chosen candidate (1 if dense)
    candidate_recalls: list[list[list[float]]]  # [layer][head][candidate], mean over texts


def choose_patterns(recalls_per_layer: Iterable[torch.Tensor], candidates: Sequence[HeadPattern],
                    min_recall: float, block_size: int = 64) -> SearchResult:
    """Per head the highest-recall candidate (first one on ties), dense below ``min_recall``.
    ``recalls_per_layer``: ``[len(candidates), Hq]`` per layer, averaged over texts."""
    layers, best, table = [], [], []
    for recalls in recalls_per_layer:
        top, winner = recalls.max(dim=0)
        heads, layer_best = [], []
        for head in range(recalls.shape[1]):
            if float(top[head]) >= min_recall:
                heads.append(candidates[int(winner[head])])
                layer_best.append(float(top[head]))
            else:
                heads.append(DenseHead())
                layer_best.append(1.0)
        layers.append(LayerHeadPatterns(tuple(heads), block_size))
        best.append(layer_best)
        table.append(recalls.t().tolist())
    return SearchResult(tuple(layers), best, table)
