"""The two-stream simulation equals, position by position, one decode step after a dense
prefill (the definition in apply.masked_dense_attention)."""

from __future__ import annotations

import math

import torch

from kv_manager.leank.apply import masked_dense_attention
from kv_manager.leank.simulate import decode_after_prefill_attention


def test_decode_stream_is_a_decode_step_after_dense_prefill():
    generator = torch.Generator().manual_seed(0)
    tokens, q_heads, kv_heads, head_dim = 12, 6, 2, 16
    query = torch.randn(2, q_heads, tokens, head_dim, generator=generator)
    key = torch.randn(2, kv_heads, tokens, head_dim, generator=generator)
    value = torch.randn(2, kv_heads, tokens, head_dim, generator=generator)
    keep = torch.rand(kv_heads, head_dim, generator=generator) > 0.6
    out = decode_after_prefill_attention(query, key, value, keep.float(),
                                         1 / math.sqrt(head_dim))
    dense = masked_dense_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                                   value[0].transpose(0, 1), torch.ones_like(keep), causal=True)
    assert torch.allclose(out[0], dense, atol=1e-5)
    for t in range(tokens):
        cache_k = torch.cat([key[0, :, :t], key[1, :, t: t + 1]], dim=1).transpose(0, 1)
        cache_v = torch.cat([value[0, :, :t], value[1, :, t: t + 1]], dim=1).transpose(0, 1)
        expected = masked_dense_attention(query[1, :, t: t + 1].transpose(0, 1), cache_k,
                                          cache_v, keep, causal=True)[0]
        assert torch.allclose(out[1, t], expected, atol=1e-5), t


def test_all_ones_factors_and_equal_streams_give_dense():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 9, 8, generator=generator).repeat(2, 1, 1, 1)
    k = torch.randn(1, 2, 9, 8, generator=generator).repeat(2, 1, 1, 1)
    v = torch.randn(1, 2, 9, 8, generator=generator).repeat(2, 1, 1, 1)
    out = decode_after_prefill_attention(q, k, v, torch.ones(2, 8), 0.35)
    assert torch.allclose(out[0], out[1], atol=1e-5)
