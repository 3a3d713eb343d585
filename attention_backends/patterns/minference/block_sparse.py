"""MInference's block-sparse head (arXiv 2407.02490, section 3.2, "Block-Sparse").

Queries and keys are mean-pooled over ``block_size``-token blocks of absolute positions; a
query block keeps the ``top_k_blocks`` causal key blocks with the largest pooled score
``mean(Q_block) . mean(K_block)`` (no scale, no softmax: only the order matters). The
diagonal block and block 0 are always kept, so every row keeps itself and the sinks
(MInference forces sinks and the local diagonals in vertical-slash for the same reason).
Within a kept block the mask is still causal per token.

Chunked prefill: a query block is pooled over its rows in this step. When chunks start on
block boundaries (``--max-num-batched-tokens`` a multiple of the block size, as vLLM's
defaults are) every block is whole and the index equals the single-shot one; a block split
across chunks pools only its rows in this chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk


def pooled(values: torch.Tensor, positions: torch.Tensor, block_size: int,
           num_blocks: int) -> torch.Tensor:
    """``[h, num_blocks, D]``: mean of ``values [h, T, D]`` over each block of positions
    (blocks with no row stay zero)."""
    device = values.device
    block_ids = positions.long().to(device) // block_size
    sums = torch.zeros(values.shape[0], num_blocks, values.shape[2], device=device)
    sums.index_add_(1, block_ids, values)
    ones = torch.ones(block_ids.numel(), device=device)
    counts = torch.zeros(num_blocks, device=device).index_add_(0, block_ids, ones)
    return sums / counts.clamp(min=1)[None, :, None]


@dataclass(frozen=True)
class BlockSparseHead:
    top_k_blocks: int = 100
    name: str = "block_sparse"

    def __post_init__(self) -> None:
        if self.top_k_blocks < 2:
            raise ValueError("block_sparse keeps the diagonal block and block 0: top_k >= 2")

    def params(self) -> dict:
        return {"top_k_blocks": self.top_k_blocks}

    def build(self, chunk: SequenceChunk, heads: list[int], block_size: int) -> HeadsIndex:
        num_tokens = chunk.num_tokens
        num_blocks = -(-num_tokens // block_size)
        pooled_keys = pooled(chunk.head_keys(heads), torch.arange(num_tokens), block_size,
                             num_blocks)
        pooled_queries = pooled(chunk.head_queries(heads), chunk.query_positions, block_size,
                                num_blocks)
        query_blocks = torch.unique(chunk.query_positions.long() // block_size).to(chunk.device)
        scores = torch.matmul(pooled_queries[:, query_blocks], pooled_keys.transpose(1, 2))
        key_blocks = torch.arange(num_blocks, device=chunk.device)
        scores.masked_fill_(key_blocks[None, :] > query_blocks[:, None], float("-inf"))
        diagonal = torch.arange(query_blocks.numel(), device=chunk.device)
        scores[:, diagonal, query_blocks] = float("inf")
        scores[:, :, 0] = float("inf")
        top = scores.topk(min(self.top_k_blocks, num_blocks), dim=2)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, top.indices, True)
        chosen &= scores > float("-inf")  # top-k may reach past the causal edge early on
        index = HeadsIndex.empty(len(heads), num_tokens, block_size, chunk.device)
        index.blocks[:, query_blocks] = chosen
        return index
