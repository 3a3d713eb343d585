"""The CPU sparse path reads vLLM's real paged cache correctly.

K/V are written by vLLM's own cache op (whatever layout this CPU's ISA uses); with the dense
pattern our path must equal vLLM's CPU attention kernel, on fresh random inputs: several
sequences of lengths that are not block multiples, a cached prefix (chunked prefill), GQA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm import _custom_ops as ops  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

from attention_backends.cpu_backend import key_block_is_dim_major, logical_key_cache  # noqa: E402
from attention_backends.kernels import sparse_prefill  # noqa: E402
from attention_backends.patterns import DensePattern, TrianglePattern  # noqa: E402

BLOCK = 128
HEAD = 64


def _paged_batch(seq_lens: list[int], query_lens: list[int], num_q_heads: int,
                 num_kv_heads: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    isa = _get_attn_isa(torch.float32, BLOCK, HEAD, "auto")
    blocks_per_seq = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    kv_cache = torch.zeros(num_blocks, num_kv_heads, BLOCK, 2 * HEAD)
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * BLOCK, HEAD).chunk(2, 2)
    # Physical blocks shuffled, so the block table really matters.
    physical = torch.randperm(num_blocks, generator=generator)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        block_table[seq, :count] = physical[used:used + count]
        used += count
    for seq, length in enumerate(seq_lens):  # write every token of every sequence
        positions = torch.arange(length)
        slots = block_table[seq, positions // BLOCK].long() * BLOCK + positions % BLOCK
        keys = torch.randn(length, num_kv_heads, HEAD, generator=generator)
        values = torch.randn(length, num_kv_heads, HEAD, generator=generator)
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    query = torch.randn(int(query_start_loc[-1]), num_q_heads, HEAD, generator=generator)
    return isa, query, key_cache, value_cache, block_table, query_start_loc, \
        torch.tensor(seq_lens, dtype=torch.int32)


def _vllm_dense(isa, query, key_cache, value_cache, block_table, query_start_loc, seq_lens,
                num_kv_heads: int) -> torch.Tensor:
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=query.shape[1], num_kv_heads=num_kv_heads,
        head_dim=HEAD, seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start_loc,
        causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False,
        dynamic_causal=None, kv_cache_dtype="auto")
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=HEAD ** -0.5, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0,
        scheduler_metadata=metadata, s_aux=None, dynamic_causal=None, k_scale=1.0,
        v_scale=1.0, kv_cache_dtype="auto")
    return out


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(3, 3), (12, 3), (8, 1)])
def test_dense_pattern_matches_vllm_cpu_kernel(num_q_heads: int, num_kv_heads: int) -> None:
    seq_lens, query_lens = [300, 77, 520], [300, 77, 200]  # third: 320 cached + 200 new
    isa, query, key_cache, value_cache, table, start_loc, lens = _paged_batch(
        seq_lens, query_lens, num_q_heads, num_kv_heads, seed=num_q_heads)
    expected = _vllm_dense(isa, query, key_cache, value_cache, table, start_loc, lens,
                           num_kv_heads)
    dim_major = key_block_is_dim_major(isa, HEAD, BLOCK, torch.float32)
    ours = sparse_prefill(query, logical_key_cache(key_cache, dim_major), value_cache, table,
                          start_loc, lens, lens, DensePattern(), HEAD ** -0.5)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_triangle_pattern_differs_from_dense_on_long_rows() -> None:
    # A negative control: a pattern that drops keys must change the output of middle rows.
    isa, query, key_cache, value_cache, table, start_loc, lens = _paged_batch(
        [600], [600], 3, 3, seed=3)
    dim_major = key_block_is_dim_major(isa, HEAD, BLOCK, torch.float32)
    keys = logical_key_cache(key_cache, dim_major)
    dense = sparse_prefill(query, keys, value_cache, table, start_loc, lens, lens,
                           DensePattern(), HEAD ** -0.5)
    triangle = sparse_prefill(query, keys, value_cache, table, start_loc, lens, lens,
                              TrianglePattern(sink_tokens=4, window_tokens=64,
                                              last_q_tokens=16), HEAD ** -0.5)
    torch.testing.assert_close(triangle[:68], dense[:68], atol=2e-5, rtol=1e-4)  # in window
    assert (triangle[200:580] - dense[200:580]).abs().max() > 1e-3  # middle rows differ
    torch.testing.assert_close(triangle[-16:], dense[-16:], atol=2e-5, rtol=1e-4)  # last q


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(12, 3), (8, 1)])
def test_per_head_path_with_dense_heads_matches_vllm_cpu_kernel(num_q_heads: int,
                                                                 num_kv_heads: int) -> None:
    from attention_backends.patterns.minference import DenseHead, LayerHeadPatterns

    seq_lens, query_lens = [300, 520], [300, 200]  # second: 320 cached + 200 new
    isa, query, key_cache, value_cache, table, start_loc, lens = _paged_batch(
        seq_lens, query_lens, num_q_heads, num_kv_heads, seed=num_q_heads + 1)
    expected = _vllm_dense(isa, query, key_cache, value_cache, table, start_loc, lens,
                           num_kv_heads)
    dim_major = key_block_is_dim_major(isa, HEAD, BLOCK, torch.float32)
    heads = LayerHeadPatterns((DenseHead(),) * num_q_heads)
    ours = sparse_prefill(query, logical_key_cache(key_cache, dim_major), value_cache, table,
                          start_loc, lens, lens, heads, HEAD ** -0.5)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
