"""Plain helpers the vLLM glue uses to route work: layer names and prefill/decode splits.

No vLLM import: these are tested directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index_from_name(layer_name: str) -> int:
    """`model.layers.17.self_attn.attn` -> 17. Raises ValueError for names without one."""
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"no layer index in attention layer name {layer_name!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class SubBatch:
    """Some sequences of a step's batch, re-packed so a kernel can take them alone."""

    token_rows: torch.Tensor  # [T_sub] int64: rows of the step's query/output tensors
    query_start_loc: torch.Tensor  # [S_sub + 1] int32
    seq_lens: torch.Tensor  # [S_sub] int32
    block_table: torch.Tensor  # [S_sub, max_blocks] int32

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.numel())

    @property
    def max_query_len(self) -> int:
        lens = self.query_start_loc[1:] - self.query_start_loc[:-1]
        return int(lens.max()) if lens.numel() else 0


@dataclass(frozen=True)
class PrefillDecodeSplit:
    prefill: SubBatch | None  # sequences with more than one new token
    decode: SubBatch | None  # sequences with exactly one new token


def _sub_batch(
    seq_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
) -> SubBatch | None:
    if seq_ids.numel() == 0:
        return None
    starts = query_start_loc[seq_ids].long()
    ends = query_start_loc[seq_ids + 1].long()
    token_rows = torch.cat([
        torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ])
    sub_start_loc = torch.zeros(seq_ids.numel() + 1, dtype=torch.int32)
    torch.cumsum((ends - starts).to(torch.int32), 0, out=sub_start_loc[1:])
    return SubBatch(
        token_rows=token_rows,
        query_start_loc=sub_start_loc,
        seq_lens=seq_lens[seq_ids].to(torch.int32),
        block_table=block_table[seq_ids],
    )


def split_prefill_decode(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor
) -> PrefillDecodeSplit:
    """Separate a step's sequences into prefill (query_len > 1) and decode (query_len == 1).

    vLLM's CPU batches are not reordered decode-first, so the two groups may interleave;
    each sub-batch carries the rows it owns in the step's packed tensors.
    """
    query_start_loc = query_start_loc.cpu()
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_seqs = query_lens.numel()
    seq_lens = seq_lens.cpu()[:num_seqs]
    block_table = block_table[:num_seqs]
    is_prefill = query_lens > 1
    return PrefillDecodeSplit(
        prefill=_sub_batch(is_prefill.nonzero().flatten(), query_start_loc, seq_lens, block_table),
        decode=_sub_batch((~is_prefill).nonzero().flatten(), query_start_loc, seq_lens,
                          block_table),
    )
