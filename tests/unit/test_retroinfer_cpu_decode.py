"""RetroInfer decode glue on vLLM's real CPU paged cache (written by vLLM's own op)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata  # noqa: E402

from attention_backends import retroinfer_decode  # noqa: E402
from attention_backends.cpu_backend import key_block_is_dim_major, logical_key_cache  # noqa: E402
from kv_manager.retroinfer.config import WaveIndexConfig  # noqa: E402
from tests.unit.test_cpu_backend_vs_vllm import BLOCK, HEAD, _paged_batch, _vllm_dense  # noqa: E402

# Small index; retrieval of every cluster makes RetroInfer exact (= vLLM's dense kernel).
EXACT = WaveIndexConfig(
    segment_tokens=128,
    tokens_per_cluster=8,
    kmeans_iterations=3,
    min_indexed_tokens=32,
    retrieval_fraction=1.0,
    estimation_fraction=0.0,
)
TINY_BUDGET = WaveIndexConfig(
    segment_tokens=128,
    tokens_per_cluster=8,
    kmeans_iterations=3,
    min_indexed_tokens=32,
    retrieval_fraction=0.0,
    estimation_fraction=0.0,
)


def _decode_batch(seq_lens: list[int], seed: int, q_heads: int = 6, kv_heads: int = 3):
    isa, query, key_cache, value_cache, table, start_loc, lens = _paged_batch(
        seq_lens, [1] * len(seq_lens), q_heads, kv_heads, seed=seed
    )
    expected = _vllm_dense(isa, query, key_cache, value_cache, table, start_loc, lens, kv_heads)
    keys = logical_key_cache(key_cache, key_block_is_dim_major(isa, HEAD, BLOCK, torch.float32))
    metadata = CPUAttentionMetadata(
        num_actual_tokens=len(seq_lens),
        max_query_len=1,
        query_start_loc=start_loc,
        max_seq_len=max(seq_lens),
        seq_lens=lens,
        block_table=table,
        slot_mapping=torch.zeros(len(seq_lens), dtype=torch.int64),
        scheduler_metadata=None,
    )
    return query, keys, value_cache, metadata, expected


def _run(query, keys, values, metadata, expected, config, min_tokens=100, layer=0):
    output = torch.full_like(query, float("nan"))
    dense_calls = []

    def dense() -> None:
        dense_calls.append(True)
        output.copy_(expected)

    answered = retroinfer_decode.forward_decode_step(
        layer, query, keys, values, metadata, output, HEAD**-0.5, min_tokens, dense, config
    )
    return output, answered, len(dense_calls)


def test_full_budget_equals_vllm_dense_and_short_sequences_stay_dense():
    query, keys, values, metadata, expected = _decode_batch([300, 40, 451], seed=0)
    retroinfer_decode.publish(metadata.query_start_loc.numpy(), ["a", "b", "c"])
    output, answered, dense_calls = _run(query, keys, values, metadata, expected, EXACT)
    assert answered == 2 and dense_calls == 1  # "b" (40 tokens) is short
    torch.testing.assert_close(output, expected, atol=2e-5, rtol=1e-4)
    assert set(retroinfer_decode.decoder(100, EXACT).states) == {("a", 0), ("c", 0)}


def test_a_tiny_budget_changes_long_rows_only():
    # Negative control: the long rows really come from RetroInfer, not from dense().
    query, keys, values, metadata, expected = _decode_batch([300, 40, 451], seed=1)
    retroinfer_decode.publish(metadata.query_start_loc.numpy(), ["a", "b", "c"])
    output, answered, _ = _run(query, keys, values, metadata, expected, TINY_BUDGET)
    assert answered == 2
    torch.testing.assert_close(output[1], expected[1])
    for row in (0, 2):
        assert (output[row] - expected[row]).abs().max() > 1e-3


def test_states_follow_on_across_steps_and_rebuild_after_a_jump():
    from kv_manager.retroinfer.attention import dense_partial

    query, keys, values, metadata, _ = _decode_batch([400], seed=2)
    decoder = retroinfer_decode.RetroInferDecoder(100, EXACT)
    table = metadata.block_table[0]
    for seq_len in (300, 301, 302, 310):
        got = decoder.decode_sequence("r", 0, query[0], keys, values, table, seq_len, HEAD**-0.5)
        # Exact attention of the step's query over its first seq_len tokens (read_tokens is
        # checked against vLLM's kernel by the first test).
        past_k, past_v = retroinfer_decode.read_tokens(keys, values, table, 0, seq_len)
        expected = dense_partial(
            query[0].view(1, 3, 2, HEAD),
            past_k.transpose(0, 1),
            past_v.transpose(0, 1),
            HEAD**-0.5,
        ).out[0]
        torch.testing.assert_close(got, expected.reshape(6, HEAD), atol=2e-5, rtol=1e-4)
    assert decoder.rebuilds == 2  # built at 300, followed on at 301 and 302, rebuilt at 310


def test_batches_the_runner_did_not_publish_stay_dense():
    query, keys, values, metadata, expected = _decode_batch([300], seed=3)
    retroinfer_decode.publish(torch.tensor([0, 5]).numpy(), ["other"])
    output, answered, dense_calls = _run(query, keys, values, metadata, expected, EXACT)
    assert answered == 0 and dense_calls == 1
    torch.testing.assert_close(output, expected)


def test_a_min_exact_token_floor_covering_the_index_equals_vllm_dense():
    # The served knob (attention.retroinfer_min_exact_tokens) on zero fractions: a floor above
    # the indexed tokens retrieves every cluster, so the long rows equal vLLM's kernel; the
    # same zero fractions without the floor do not (test_a_tiny_budget_changes_long_rows_only).
    floor = WaveIndexConfig(**{**TINY_BUDGET.__dict__, "min_exact_tokens": 10_000})
    query, keys, values, metadata, expected = _decode_batch([300, 40, 451], seed=4)
    retroinfer_decode.publish(metadata.query_start_loc.numpy(), ["a", "b", "c"])
    output, answered, _ = _run(query, keys, values, metadata, expected, floor)
    assert answered == 2
    torch.testing.assert_close(output, expected, atol=2e-5, rtol=1e-4)
