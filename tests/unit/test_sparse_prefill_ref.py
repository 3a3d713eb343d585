"""The torch reference against a naive dense-mask oracle, on fresh random inputs."""

import math

import pytest
import torch

from attention_backends.kernels import sparse_prefill, sparse_prefill_ref
from attention_backends.kernels.paged_inputs import make_paged_prefill_batch
from attention_backends.patterns import DensePattern, TrianglePattern

SMALL_TRIANGLE = TrianglePattern(sink_tokens=4, window_tokens=24, last_q_tokens=10, block_size=16)


def naive_oracle(batch, pattern_params, scale):
    """Float64 attention with an explicit [queries, keys] mask built element by element
    from the pattern's definition (independent of the pattern classes)."""
    sink, window, last_q = pattern_params
    outputs = []
    starts = batch.query_start_loc.tolist()
    for seq, (seq_len, prompt_len) in enumerate(
        zip(batch.seq_lens.tolist(), batch.prompt_lens.tolist(), strict=True)
    ):
        queries = batch.query[starts[seq] : starts[seq + 1]].double()
        query_len = queries.shape[0]
        keys, values = batch.seq_keys[seq].double(), batch.seq_values[seq].double()
        group = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        mask = torch.zeros(query_len, seq_len, dtype=torch.bool)
        for i in range(query_len):
            q = seq_len - query_len + i
            for k in range(q + 1):
                mask[i, k] = k < sink or q - k < window or q >= prompt_len - last_q
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
    return torch.cat(outputs)


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def run_case(seq_lens, *, query_lens=None, prompt_lens=None, q_heads=8, kv_heads=2, block_size=16,
             pattern=SMALL_TRIANGLE, head_dim=32, seed=None):  # fmt: skip
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    batch = make_paged_prefill_batch(
        seq_lens,
        query_lens,
        prompt_lens,
        q_heads,
        kv_heads,
        head_dim,
        block_size,
        generator=generator,
    )
    scale = 1 / math.sqrt(head_dim)
    out = torch.full_like(batch.query, float("nan"))
    sparse_prefill_ref(
        batch.query, batch.key_cache, batch.value_cache, batch.block_table, batch.query_start_loc,
        batch.seq_lens, batch.prompt_lens, pattern, scale, out=out, query_block_tokens=16,
    )  # fmt: skip
    if pattern.is_dense:
        params = (0, 1 << 30, 0)
    else:
        params = (pattern.sink_tokens, pattern.window_tokens, pattern.last_q_tokens)
    expected = naive_oracle(batch, params, scale)
    assert not torch.isnan(out).any(), "some output rows were not written"
    return relative_error(out, expected)


@pytest.mark.parametrize("seq_len", [1, 13, 47, 100, 131])
def test_single_sequence_lengths_not_multiple_of_block(seq_len):
    assert run_case([seq_len]) < 1e-5


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (16, 2), (9, 3)])
def test_gqa_ratios(q_heads, kv_heads):
    assert run_case([77, 40], q_heads=q_heads, kv_heads=kv_heads) < 1e-5


def test_several_sequences_of_different_lengths():
    assert run_case([5, 90, 33, 61]) < 1e-5


def test_chunked_prefill_suffix_queries_non_final_chunk():
    # queries are the last 30 of 70 cached tokens; the prompt continues to 75, so rows at
    # positions >= 65 are last-q rows although they are not at the end of this chunk
    assert run_case([70, 50], query_lens=[30, 50], prompt_lens=[75, 50]) < 1e-5


def test_chunked_prefill_final_chunk():
    assert run_case([90], query_lens=[17], prompt_lens=[90]) < 1e-5


def test_large_cache_block_like_vllm_cpu():
    assert run_case([300, 129], block_size=128) < 1e-5


def test_window_wider_than_sequence_is_dense():
    wide = TrianglePattern(sink_tokens=4, window_tokens=1000, last_q_tokens=0)
    assert run_case([60], pattern=wide) < 1e-5


def test_dense_pattern_equals_causal_sdpa():
    generator = torch.Generator().manual_seed(7)
    batch = make_paged_prefill_batch(
        [70, 45], num_q_heads=8, num_kv_heads=2, head_dim=32, generator=generator
    )
    out = sparse_prefill(
        batch.query, batch.key_cache, batch.value_cache, batch.block_table, batch.query_start_loc,
        batch.seq_lens, batch.prompt_lens, DensePattern(), 1 / math.sqrt(32),
    )  # fmt: skip
    starts = batch.query_start_loc.tolist()
    for seq in range(2):
        q = batch.query[starts[seq] : starts[seq + 1]].transpose(0, 1)
        k = batch.seq_keys[seq].transpose(0, 1).repeat_interleave(4, dim=0)
        v = batch.seq_values[seq].transpose(0, 1).repeat_interleave(4, dim=0)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(
            out[starts[seq] : starts[seq + 1]], expected.transpose(0, 1), atol=1e-5, rtol=1e-4
        )


def test_dense_pattern_matches_oracle():
    assert run_case([50, 23], pattern=DensePattern(block_size=16)) < 1e-5


def test_sparse_differs_from_dense_where_middle_is_dropped():
    """Negative control: the oracle comparison can fail."""
    generator = torch.Generator().manual_seed(3)
    batch = make_paged_prefill_batch([120], generator=generator, head_dim=32)
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_table,
            batch.query_start_loc, batch.seq_lens, batch.prompt_lens)  # fmt: skip
    dense = sparse_prefill_ref(*args, DensePattern(), 0.2)
    sparse = sparse_prefill_ref(*args, SMALL_TRIANGLE, 0.2)
    assert torch.allclose(dense[:24], sparse[:24], atol=1e-6)  # inside the window: same
    assert not torch.allclose(dense[60:100], sparse[60:100], atol=1e-3)  # middle dropped
    assert torch.allclose(dense[110:], sparse[110:], atol=1e-5)  # last-q rows: dense
