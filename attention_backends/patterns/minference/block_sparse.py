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


def pooled_contiguous(values: torch.Tensor, first_pos: int, block_size: int,
                      num_blocks: int) -> torch.Tensor:
    """``pooled`` for rows at consecutive positions ``first_pos ..``: ``values [T, h, D]``
    (any float dtype) to float32 ``[h, num_blocks, D]`` by padding to whole blocks and one
    float32-accumulating sum per block, with no float32 copy of the rows and no atomics
    (``index_add_`` on CUDA is one atomic add per element: ~1G at 128K with 32 heads). The
    same means as ``pooled`` up to the order of float additions."""
    rows, num_heads, dims = values.shape
    lead = first_pos % block_size
    first_block = first_pos // block_size
    span = -(-(lead + rows) // block_size)
    tail = span * block_size - lead - rows
    # whole blocks (a fresh 128K prefill) need no padded copy
    padded = values if lead == tail == 0 else torch.nn.functional.pad(
        values, (0, 0, 0, 0, lead, tail))
    sums = padded.reshape(span, block_size, num_heads, dims).sum(dim=1, dtype=torch.float32)
    positions = torch.arange(first_pos, first_pos + rows, device=values.device)
    counts = torch.bincount(positions // block_size - first_block, minlength=span)
    means = (sums / counts.clamp(min=1)[:, None, None]).permute(1, 0, 2)  # [h, span, D]
    out = torch.zeros(num_heads, num_blocks, dims, device=values.device)
    out[:, first_block:first_block + span] = means
    return out


def pooled_heads(chunk: SequenceChunk, heads: list[int], block_size: int, num_blocks: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled queries, pooled keys) ``[h, num_blocks, D]`` float32 of the given heads. On
    CUDA ``pooled_contiguous``, keys pooled once per KV head; elsewhere ``pooled`` on the
    float32 copies (the CPU reference, unchanged)."""
    if chunk.device.type != "cuda":
        return (pooled(chunk.head_queries(heads), chunk.query_positions, block_size, num_blocks),
                pooled(chunk.head_keys(heads), torch.arange(chunk.num_tokens), block_size,
                       num_blocks))
    return pooled_heads_contiguous(chunk, heads, block_size, num_blocks)


def pooled_heads_contiguous(chunk: SequenceChunk, heads: list[int], block_size: int,
                            num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pooled_heads``' CUDA path (any device)."""
    kv_heads = torch.tensor([head // chunk.group for head in heads], device=chunk.device)
    keys = pooled_contiguous(chunk.keys, 0, block_size, num_blocks)[kv_heads]
    first_pos = int(chunk.query_positions[0])
    every_head = list(heads) == list(range(int(chunk.query.shape[1])))
    rows = chunk.query if every_head else chunk.query[:, heads]  # no copy for a whole layer
    queries = pooled_contiguous(rows, first_pos, block_size, num_blocks)
    return queries, keys


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
        pooled_queries, pooled_keys = pooled_heads(chunk, heads, block_size, num_blocks)
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
