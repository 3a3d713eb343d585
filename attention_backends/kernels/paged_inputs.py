"""Random prefill batches in vLLM's paged layout, for tests and benchmarks.

The cache is laid out like vLLM's CPU cache, ``[num_blocks, Hkv, 2 * block_size, D]`` with K
in the first half of dim 2 and V in the second, so ``key_cache``/``value_cache`` are strided
views. Physical blocks are a random permutation with spare blocks in between, and the block
table's unused columns point at real (wrong) blocks, so an indexing bug reads wrong data
instead of zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedPrefillBatch:
    """Inputs of ``sparse_prefill`` plus the token-ordered K/V of each sequence."""

    query: torch.Tensor  # [T, Hq, D]
    key_cache: torch.Tensor  # [num_blocks, Hkv, block_size, D] strided view
    value_cache: torch.Tensor  # same
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    prompt_lens: torch.Tensor  # int32 [num_seqs]
    seq_keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D]
    seq_values: list[torch.Tensor]


def make_paged_prefill_batch(
    seq_lens: list[int],
    query_lens: list[int] | None = None,
    prompt_lens: list[int] | None = None,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    spare_blocks: int = 3,
) -> PagedPrefillBatch:
    """Random batch: sequence ``s`` has ``seq_lens[s]`` tokens in the cache, of which the last
    ``query_lens[s]`` are this step's queries (default: all), and a prompt of
    ``prompt_lens[s]`` tokens (default: ``seq_lens[s]``; larger means a non-final chunk)."""
    query_lens = list(seq_lens) if query_lens is None else list(query_lens)
    prompt_lens = list(seq_lens) if prompt_lens is None else list(prompt_lens)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 2  # extra columns, filled with wrong blocks
    num_blocks = sum(blocks_per_seq) + spare_blocks
    storage = torch.randn(
        num_blocks, num_kv_heads, 2 * block_size, head_dim, generator=generator, dtype=torch.float32
    ).to(dtype=dtype, device=device)
    key_cache, value_cache = storage[:, :, :block_size], storage[:, :, block_size:]
    order = torch.randperm(num_blocks, generator=generator)
    block_table = order[
        torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=generator)
    ]
    seq_keys, seq_values = [], []
    next_block = 0
    for seq_index, seq_len in enumerate(seq_lens):
        count = blocks_per_seq[seq_index]
        physical = order[next_block : next_block + count]
        next_block += count
        block_table[seq_index, :count] = physical
        gathered_k = (
            key_cache[physical.to(device)].permute(0, 2, 1, 3).reshape(-1, num_kv_heads, head_dim)
        )
        gathered_v = (
            value_cache[physical.to(device)].permute(0, 2, 1, 3).reshape(-1, num_kv_heads, head_dim)
        )
        seq_keys.append(gathered_k[:seq_len])
        seq_values.append(gathered_v[:seq_len])
    query = torch.randn(sum(query_lens), num_q_heads, head_dim, generator=generator).to(
        dtype=dtype, device=device
    )
    starts = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return PagedPrefillBatch(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table.to(torch.int32).to(device),
        query_start_loc=starts.to(device),
        seq_lens=as_int32(seq_lens),
        prompt_lens=as_int32(prompt_lens),
        seq_keys=seq_keys,
        seq_values=seq_values,
    )
