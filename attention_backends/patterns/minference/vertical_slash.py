"""MInference's vertical-slash head (arXiv 2407.02490, section 3.2, "Vertical-Slash").

Kept pairs: a set of key columns V (verticals) plus a set of diagonals S (slashes, offset
``q - k``). Both are estimated online, per head, from the last ``last_q_tokens`` queries:

    A = softmax(Q_last K^T * scale)              causal inside the last rows, float32
    vertical_score(k) = sum_rows A[row, k]        +inf for k < sink_tokens (always kept)
    slash_score(s)    = sum over A[row, k] with q_row - k = s   +inf for s < local_tokens
    V = top-vertical_size(vertical_score), S = top-slash_size(slash_score)

Sizes count the forced columns/diagonals and are clamped to the sequence. MInference's
defaults are 30 forced sinks, 100 forced diagonals and 64 last queries
(``minference_forward.py``); its configs use sizes for 128K prompts, so our searched configs
carry their own sizes.

Chunked prefill: a chunk estimates from its own last queries over the keys up to its end
(the queries of earlier chunks are gone: vLLM caches only K/V). For a prompt prefilled in one
step this is exactly the paper's estimate; for an early chunk it is the estimate the paper
would make for a prompt that ended there (vLLM's V0 DualChunk backend made the same choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk

PAPER_LAST_Q_TOKENS = 64
PAPER_SINK_TOKENS = 30
PAPER_LOCAL_TOKENS = 100


def last_rows_attention(chunk: SequenceChunk, heads: list[int], last_q_tokens: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities ``[h, L, N]`` float32, positions ``[L]``) of the chunk's last ``L``
    queries (``L = min(last_q_tokens, rows)``) over every key, causal."""
    rows = min(last_q_tokens, int(chunk.query.shape[0]))
    positions = chunk.query_positions[-rows:].long().to(chunk.device)
    # slice the last rows before the float copy: at 128K x 32 heads, the copy of every row
    # (head_queries) is 2 GiB of float32 for 64 rows used
    queries = chunk.query[-rows:][:, heads].float().permute(1, 0, 2)
    scores = torch.matmul(queries, chunk.head_keys(heads).transpose(1, 2)) * chunk.scale
    future = torch.arange(chunk.num_tokens, device=chunk.device)[None, :] > positions[:, None]
    scores.masked_fill_(future, float("-inf"))
    return torch.softmax(scores, dim=-1), positions


def slash_scores(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float ``[h, N]``: attention mass of each diagonal offset ``s = q - k`` (``s < N``)."""
    num_heads, _, num_tokens = probs.shape
    offsets = positions[:, None] - torch.arange(num_tokens, device=probs.device)[None, :]  # [L, N]
    valid = offsets >= 0
    flat_offsets = offsets.clamp(min=0).reshape(1, -1).expand(num_heads, -1)
    mass = (probs * valid).reshape(num_heads, -1)
    return torch.zeros(num_heads, num_tokens, device=probs.device).scatter_add_(1, flat_offsets,
                                                                                mass)


def last_rows_scores(chunk: SequenceChunk, heads: list[int], last_q_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical, slash) float ``[h, N]``: column and diagonal sums of the last rows'
    attention. On CUDA (head dim a power of two >= 16, <= 128 rows) two Triton passes
    (``kernels.vertical_slash_estimate_triton``: no float copy of every key per head, no
    1 GiB score matrix at 128K); elsewhere the torch reference below. They agree to float
    rounding (the order of additions differs), not bit for bit."""
    rows = min(last_q_tokens, int(chunk.query.shape[0]))
    head_dim = int(chunk.query.shape[-1])
    if (chunk.device.type == "cuda" and rows <= 128 and head_dim >= 16
            and head_dim & (head_dim - 1) == 0):
        from attention_backends.kernels.vertical_slash_estimate_triton import (
            last_rows_scores_triton,
        )

        return last_rows_scores_triton(chunk.query[-rows:], chunk.query_positions[-rows:],
                                       chunk.keys, heads, chunk.scale)
    probs, positions = last_rows_attention(chunk, heads, last_q_tokens)
    return probs.sum(dim=1), slash_scores(probs, positions)


@dataclass(frozen=True)
class VerticalSlashHead:
    vertical_size: int = 1000
    slash_size: int = 6096
    last_q_tokens: int = PAPER_LAST_Q_TOKENS
    sink_tokens: int = PAPER_SINK_TOKENS
    local_tokens: int = PAPER_LOCAL_TOKENS
    name: str = "vertical_slash"

    def __post_init__(self) -> None:
        if self.last_q_tokens < 1 or self.local_tokens < 1:
            raise ValueError("vertical_slash needs last_q_tokens >= 1 and local_tokens >= 1 "
                             "(the forced diagonal 0 keeps every row non-empty)")
        if self.vertical_size < self.sink_tokens or self.slash_size < self.local_tokens:
            raise ValueError("vertical_size/slash_size must hold the forced sinks/local band")

    def params(self) -> dict:
        return {"vertical_size": self.vertical_size, "slash_size": self.slash_size,
                "last_q_tokens": self.last_q_tokens, "sink_tokens": self.sink_tokens,
                "local_tokens": self.local_tokens}

    def build(self, chunk: SequenceChunk, heads: list[int], block_size: int) -> HeadsIndex:
        vertical, slash = last_rows_scores(chunk, heads, self.last_q_tokens)
        num_tokens = chunk.num_tokens
        vertical[:, : self.sink_tokens] = float("inf")
        slash[:, : self.local_tokens] = float("inf")
        index = HeadsIndex.empty(len(heads), num_tokens, block_size, chunk.device)
        top_columns = vertical.topk(min(self.vertical_size, num_tokens), dim=1).indices
        index.columns.scatter_(1, top_columns, True)
        top_diagonals = slash.topk(min(self.slash_size, num_tokens), dim=1).indices
        index.diagonals.scatter_(1, top_diagonals, True)
        return index
