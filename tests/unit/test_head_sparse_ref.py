"""The per-head torch reference against dense attention with the same mask, on fresh random
paged batches (ragged lengths, GQA, chunked prefill, cache block sizes), with a per-row bound."""

import math

import pytest
import torch

from attention_backends.kernels import sparse_prefill, sparse_prefill_ref
from attention_backends.kernels.head_sparse_ref import attend_with_index
from attention_backends.kernels.paged_inputs import make_paged_prefill_batch
from attention_backends.patterns import TrianglePattern
from attention_backends.patterns.minference import (
    AShapeHead,
    BlockSparseHead,
    DenseHead,
    LayerHeadPatterns,
    SequenceChunk,
    TriangleHead,
    VerticalSlashHead,
)
from attention_backends.patterns.mminference.grid import GridHead

ROW_BOUND = 1e-5  # float32 vs float64, relative per (row, head)


def mixed_heads(num_heads):
    """A layer that mixes every pattern (small sizes so each drops keys at these lengths)."""
    choices = [
        VerticalSlashHead(vertical_size=12, slash_size=10, last_q_tokens=16, sink_tokens=3,
                          local_tokens=4),
        BlockSparseHead(top_k_blocks=3),
        AShapeHead(sink_tokens=4, window_tokens=20),
        TriangleHead(sink_tokens=2, window_tokens=16, last_q_tokens=9),
        GridHead(vision_start=8, vision_end=60, stride=13, phase_q=1, phase_k=5, sink_tokens=2,
                 window_tokens=6),
        DenseHead(),
    ]
    return LayerHeadPatterns(tuple(choices[h % len(choices)] for h in range(num_heads)),
                             block_size=16)


def dense_with_mask(batch, layer, scale):
    """Float64 softmax attention over all keys with the index's full keep mask: the oracle."""
    outputs = []
    starts = batch.query_start_loc.tolist()
    for seq, (seq_len, prompt_len) in enumerate(zip(batch.seq_lens.tolist(),
                                                    batch.prompt_lens.tolist(), strict=True)):
        query = batch.query[starts[seq]:starts[seq + 1]]
        rows = query.shape[0]
        positions = torch.arange(seq_len - rows, seq_len)
        chunk = SequenceChunk(query, positions, batch.seq_keys[seq], prompt_len, scale)
        keep = layer.build_index(chunk).keep_mask(positions)  # [H, rows, N]
        group = query.shape[1] // batch.seq_keys[seq].shape[1]
        keys = batch.seq_keys[seq].double().repeat_interleave(group, dim=1)
        values = batch.seq_values[seq].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query.double(), keys) * scale
        scores = scores.masked_fill(~keep, float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
    return torch.cat(outputs)


def worst_row_error(actual, expected):
    """Max over (row, head) of ||actual - expected|| / ||expected||."""
    diff = (actual.double() - expected).norm(dim=-1)
    return float((diff / expected.norm(dim=-1).clamp(min=1e-12)).max())


def run_case(seq_lens, query_lens=None, prompt_lens=None, q_heads=6, kv_heads=2, block_size=16,
             head_dim=32, layer=None, dtype=torch.float32):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    batch = make_paged_prefill_batch(seq_lens, query_lens, prompt_lens, q_heads, kv_heads,
                                     head_dim, block_size, dtype=dtype, generator=generator)
    layer = layer or mixed_heads(q_heads)
    scale = 1 / math.sqrt(head_dim)
    out = torch.full_like(batch.query, float("nan"))
    sparse_prefill(batch.query, batch.key_cache, batch.value_cache, batch.block_table,
                   batch.query_start_loc, batch.seq_lens, batch.prompt_lens, layer, scale, out=out)
    assert not torch.isnan(out).any(), "some output rows were not written"
    return worst_row_error(out, dense_with_mask(batch, layer, scale))


@pytest.mark.parametrize("seq_lens", [[1], [13, 100], [5, 90, 33, 61], [131]])
def test_ragged_lengths(seq_lens):
    assert run_case(seq_lens) < ROW_BOUND


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (9, 3), (6, 1)])
def test_gqa_ratios(q_heads, kv_heads):
    assert run_case([77, 40], q_heads=q_heads, kv_heads=kv_heads) < ROW_BOUND


def test_chunked_prefill_early_and_final_chunks():
    assert run_case([70, 90, 50], query_lens=[30, 17, 50], prompt_lens=[75, 90, 50]) < ROW_BOUND


def test_large_cache_blocks_like_vllm_cpu():
    assert run_case([300, 129], block_size=128) < ROW_BOUND


def test_half_inputs_compute_in_float32():
    assert run_case([80, 45], dtype=torch.bfloat16) < 1e-2  # the bound of bf16 output rounding


def test_the_oracle_detects_a_dropped_key():
    """Negative control: the same comparison fails when the reference drops one kept key."""
    generator = torch.Generator().manual_seed(11)
    query = torch.randn(40, 2, 16, generator=generator)
    keys = torch.randn(40, 1, 16, generator=generator)
    values = torch.randn(40, 1, 16, generator=generator)
    positions = torch.arange(40)
    chunk = SequenceChunk(query, positions, keys, 40, 0.25)
    layer = LayerHeadPatterns((AShapeHead(4, 8), DenseHead()), block_size=16)
    index = layer.build_index(chunk)
    out = attend_with_index(query, positions, keys, values, index, 0.25)
    index.columns[0, 2] = False  # the reference now misses sink key 2 for head 0
    damaged = attend_with_index(query, positions, keys, values, index, 0.25)
    # from row 10 on, key 2 lies outside the window: every such row must show the damage
    assert (out - damaged)[10:, 0].norm(dim=-1).min() > ROW_BOUND * 10
    assert torch.equal(out[:, 1], damaged[:, 1])


def test_triangle_heads_give_the_trianglemix_kernel_result():
    """TriangleMix as a per-head config computes what the TriangleMix reference computes."""
    generator = torch.Generator().manual_seed(12)
    batch = make_paged_prefill_batch([90, 70], [90, 30], [90, 95], 6, 2, 32, 16,
                                     generator=generator)
    scale = 1 / math.sqrt(32)
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_table,
            batch.query_start_loc, batch.seq_lens, batch.prompt_lens)
    as_heads = sparse_prefill(*args, LayerHeadPatterns((TriangleHead(4, 24, 10),) * 6), scale)
    as_layer = sparse_prefill_ref(*args, TrianglePattern(4, 24, 10), scale)
    torch.testing.assert_close(as_heads, as_layer, rtol=1e-5, atol=1e-5)
