"""Per-head sparse prefill attention in plain torch: the CPU path and the test oracle for
every pattern of ``patterns/minference`` (and MMInference's grid).

Each head keeps its own set of pairs (``HeadsIndex``). Per block of query rows the reference
builds the ``[Hq, rows, keys]`` keep mask (bool: cheap next to the matmul, which is ``D``
times larger), gathers only the keys that some head of the block keeps, and runs one masked
softmax over them. Memory is ``O(Hq x rows x N)`` bools plus ``O(Hq x rows x gathered keys)``
floats, never ``N x N``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from attention_backends.kernels.sparse_prefill_ref import gather_sequence_kv
from attention_backends.patterns.minference.index import HeadsIndex, SequenceChunk


def attend_with_index(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: HeadsIndex,
    scale: float,
    query_block_tokens: int = 128,
) -> torch.Tensor:
    """Masked attention of one sequence's rows.

    query ``[R, Hq, D]`` at int64 positions ``[R]``; keys/values ``[N, Hkv, D]`` token order
    (same dtype as query, the compute dtype); index over ``N`` tokens and ``Hq`` heads.
    Returns ``[R, Hq, D]``. Every row keeps at least one key by construction of the patterns
    (they keep diagonal 0 or the diagonal block); a row that keeps none would be NaN.
    """
    num_rows, num_q_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(query)
    for begin in range(0, num_rows, query_block_tokens):
        end = min(begin + query_block_tokens, num_rows)
        positions = query_positions[begin:end]
        keep = index.keep_mask(positions, num_keys=int(positions.max()) + 1)  # [Hq, r, K]
        used = keep.any(dim=1).any(dim=0).nonzero().flatten()
        keep = keep[:, :, used].view(num_kv_heads, group, end - begin, used.numel())
        rows = query[begin:end].view(end - begin, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        gathered_keys = keys[used].permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, K]
        scores = torch.matmul(rows, gathered_keys) * scale  # [Hkv, G, r, K]
        scores.masked_fill_(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        attended = torch.matmul(probs, values[used].permute(1, 0, 2).unsqueeze(1))
        out[begin:end] = attended.permute(2, 0, 1, 3).reshape(end - begin, num_q_heads, head_dim)
    return out


def sequences_with_rows(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, prompt_lens: torch.Tensor
) -> Iterator[tuple[int, int, int, int, int]]:
    """``(seq, begin, end, seq_len, prompt_len)`` for every sequence with rows in this step
    (its rows are ``query[begin:end]``, the last ones of its first ``seq_len`` tokens)."""
    starts = query_start_loc.tolist()
    for seq, (seq_len, prompt_len) in enumerate(zip(seq_lens.tolist(), prompt_lens.tolist(),
                                                    strict=True)):
        if starts[seq + 1] > starts[seq]:
            yield seq, starts[seq], starts[seq + 1], seq_len, int(prompt_len)


def sequence_chunks(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    scale: float,
) -> Iterator[tuple[int, int, int, SequenceChunk]]:
    """``(seq, begin, end, chunk)`` for every sequence with rows in this step: its rows
    ``query[begin:end]`` and its keys gathered from the paged cache, both in the compute
    dtype (float32 for half inputs), at their positions in the sequence."""
    compute_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    for seq, begin, end, seq_len, prompt_len in sequences_with_rows(query_start_loc, seq_lens,
                                                                    prompt_lens):
        keys = gather_sequence_kv(key_cache, block_table[seq], seq_len).to(compute_dtype)
        positions = torch.arange(seq_len - (end - begin), seq_len)
        yield seq, begin, end, SequenceChunk(query[begin:end].to(compute_dtype), positions,
                                             keys, prompt_len, scale)


def head_sparse_prefill_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    layer_heads,  # LayerHeadPatterns (not imported: the policy module imports this one's package)
    scale: float,
    out: torch.Tensor | None = None,
    query_block_tokens: int = 128,
    indexes: list | None = None,
) -> torch.Tensor:
    """``sparse_prefill``'s contract (see ``kernels/__init__.py``) with a per-head pattern.

    Per sequence: gather its K/V from the paged cache, let each head's pattern build its
    index from this step's rows (``SequenceChunk``), attend. Half inputs compute in float32.
    ``indexes``: one ``HeadsIndex`` per sequence with rows, used instead of building them
    (the kernel tests attend through the index the Triton path estimated).
    """
    if out is None:
        out = torch.empty_like(query)
    given = None if indexes is None else iter(indexes)
    for seq, begin, end, chunk in sequence_chunks(query, key_cache, block_table,
                                                  query_start_loc, seq_lens, prompt_lens, scale):
        values = gather_sequence_kv(value_cache, block_table[seq], chunk.num_tokens)
        index = layer_heads.build_index(chunk) if given is None else next(given)
        out[begin:end] = attend_with_index(chunk.query, chunk.query_positions, chunk.keys,
                                           values.to(chunk.keys.dtype), index, scale,
                                           query_block_tokens).to(out.dtype)
    assert given is None or next(given, None) is None, "more indexes than sequences with rows"
    return out
