"""The prefill/decode split of a step's batch, which the vLLM glue of both backends uses.

No vLLM import: tested directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SubBatch:
    """Some sequences of a step's batch, re-packed so a kernel can take them alone."""

    token_rows: torch.Tensor  # [T_sub] int64: rows of the step's query/output tensors
    query_start_loc: torch.Tensor  # [S_sub + 1] int32
    seq_lens: torch.Tensor  # [S_sub] int32
    block_table: torch.Tensor  # [S_sub, max_blocks] int32
    prompt_lens: torch.Tensor  # [S_sub] int32: whole prompt (decides TriangleMix's last rows)
    # (first, end) when the rows are one contiguous run (a lone prefill, or decodes that
    # vLLM put first): kernels then read and write slices instead of gathered copies
    row_range: tuple[int, int] | None
    # host copies, for counting without a device sync
    seq_lens_host: np.ndarray
    query_lens_host: np.ndarray
    prompt_lens_host: np.ndarray

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.numel())

    def rows_in_last(self, last_tokens: int) -> int:
        """How many of the sub-batch's query rows lie among their prompt's last
        ``last_tokens`` positions (TriangleMix's dense last rows)."""
        first_position = self.seq_lens_host - self.query_lens_host
        first_last_row = np.maximum(self.prompt_lens_host - last_tokens, first_position)
        return int(np.clip(self.seq_lens_host - first_last_row, 0, None).sum())

    @property
    def max_query_len(self) -> int:
        lens = self.query_start_loc[1:] - self.query_start_loc[:-1]
        return int(lens.max()) if lens.numel() else 0


@dataclass(frozen=True)
class PrefillDecodeSplit:
    prefill: SubBatch | None  # sequences with more than one new token
    decode: SubBatch | None  # sequences with exactly one new token


def _sub_batch(
    seq_ids: np.ndarray,
    query_start_loc: np.ndarray,
    seq_lens: np.ndarray,
    prompt_lens: np.ndarray,
    block_table: torch.Tensor,
) -> SubBatch | None:
    if seq_ids.size == 0:
        return None
    device = block_table.device
    starts, ends = query_start_loc[seq_ids], query_start_loc[seq_ids + 1]
    sub_seq_lens = seq_lens[seq_ids]
    sub_prompt_lens = np.asarray(prompt_lens[seq_ids], dtype=np.int64)
    token_rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    sub_start_loc = np.zeros(seq_ids.size + 1, dtype=np.int32)
    np.cumsum(ends - starts, out=sub_start_loc[1:])

    def to_device(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
        return host.to(device, non_blocking=True)

    return SubBatch(
        token_rows=to_device(token_rows, torch.int64),
        query_start_loc=to_device(sub_start_loc, torch.int32),
        seq_lens=to_device(sub_seq_lens, torch.int32),
        block_table=block_table[to_device(seq_ids, torch.int64)],
        prompt_lens=to_device(sub_prompt_lens, torch.int32),
        row_range=(
            (int(token_rows[0]), int(token_rows[-1]) + 1)
            if token_rows[-1] - token_rows[0] + 1 == token_rows.size else None
        ),
        seq_lens_host=sub_seq_lens,
        query_lens_host=ends - starts,
        prompt_lens_host=sub_prompt_lens,
    )


def split_prefill_decode(
    query_start_loc: torch.Tensor | np.ndarray,
    seq_lens: torch.Tensor | np.ndarray,
    block_table: torch.Tensor,
    prompt_lens: torch.Tensor | np.ndarray | None = None,
) -> PrefillDecodeSplit:
    """Separate a step's sequences into prefill (query_len > 1) and decode (query_len == 1).

    query_start_loc ``[num_seqs + 1]``, seq_lens and prompt_lens ``[>= num_seqs]`` are host
    values (CPU tensors or arrays; the builder's CPU copies); block_table stays where it
    is, and every sub-batch tensor is put on its device. prompt_lens defaults to seq_lens
    (each chunk's end taken for its prompt's end). Batches need not be reordered
    decode-first (vLLM's CPU and V2 runners do not), so the groups may interleave; each
    sub-batch carries the rows it owns in the step's packed tensors. Sequences with no new
    token (padding) belong to neither group.
    """
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_seqs = query_lens.size
    seq_lens = np.asarray(seq_lens, dtype=np.int64)[:num_seqs]
    prompt_lens = seq_lens if prompt_lens is None else np.asarray(prompt_lens)[:num_seqs]
    block_table = block_table[:num_seqs]
    prefill_ids = np.flatnonzero(query_lens > 1)
    decode_ids = np.flatnonzero(query_lens == 1)
    return PrefillDecodeSplit(
        prefill=_sub_batch(prefill_ids, query_start_loc, seq_lens, prompt_lens, block_table),
        decode=_sub_batch(decode_ids, query_start_loc, seq_lens, prompt_lens, block_table),
    )


def pattern_for_sub_batch(pattern, sub: SubBatch):
    """The pattern to launch for these rows: without last rows when none of them is among
    its prompt's last ``last_q_tokens`` positions (every chunk of a long prompt but the
    last), which computes the same function on these rows and lets the GPU path skip its
    last-row kernels. Under vLLM's 8K chunks of a 128K prompt those kernels cost 1.7 ms of
    the layer's 5.0 ms, launched in all 16 chunks (benchmarks/trianglemix_chunked_kernel.py).
    """
    last_q_tokens = getattr(pattern, "last_q_tokens", 0)
    if last_q_tokens and sub.rows_in_last(last_q_tokens) == 0:
        return dataclasses.replace(pattern, last_q_tokens=0)
    return pattern
