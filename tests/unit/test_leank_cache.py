"""LeanK's vLLM glue on synthetic pages (no worker): the packed page spec, the pruned write,
and attention over the pages equal to the definition (prefill dense over the chunk's own
keys, earlier tokens and decode on the kept channels, fully pruned heads from block sums)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from attention_backends import leank_cache  # noqa: E402
from attention_backends.leank_cache import LeanKLayer, ServedLeanK  # noqa: E402
from attention_backends.policy import ModelFingerprint  # noqa: E402
from kv_manager.leank.apply import masked_dense_attention  # noqa: E402
from kv_manager.leank.layout import LayerLayout  # noqa: E402
from kv_manager.leank.mask import LeanKMask  # noqa: E402

KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK = 3, 9, 64, 16
FINGERPRINT = ModelFingerprint("LlamaForCausalLM", 2, 576, Q_HEADS, KV_HEADS, 100)


def served(counts_per_layer: list[list[int]], seed: int = 0) -> ServedLeanK:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(counts_per_layer), KV_HEADS, HEAD_DIM, dtype=torch.bool)
    for layer, counts in enumerate(counts_per_layer):
        for head, count in enumerate(counts):
            keep[layer, head, torch.randperm(HEAD_DIM, generator=generator)[:count]] = True
    return ServedLeanK(LeanKMask(FINGERPRINT, keep, sparsity=0.5, align=16))


# Layer 0 has a fully pruned head; layer 1 is the widest row (page row for both).
SERVED = served([[16, 0, 32], [48, 16, 32]])


def layer_cache(num_blocks: int = 12) -> tuple[LeanKLayer, SimpleNamespace, torch.Tensor]:
    glue = LeanKLayer(SERVED, Q_HEADS)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    kv_cache = torch.full((num_blocks, 1, BLOCK, SERVED.page_row_width), float("nan"))
    return glue, layer, kv_cache


def metadata(query_lens: list[int], seq_lens: list[int], block_table: list[list[int]]):
    starts = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    return SimpleNamespace(query_start_loc=starts,
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                           block_table=torch.tensor(block_table, dtype=torch.int32),
                           num_actual_tokens=int(starts[-1]))


def slots(block_row: list[int], first: int, count: int) -> torch.Tensor:
    positions = torch.arange(first, first + count)
    return torch.tensor(block_row)[positions // BLOCK] * BLOCK + positions % BLOCK


def run_step(glue, layer, kv_cache, q, k, v, meta, slot_mapping):
    glue.write(layer, k, v, kv_cache, slot_mapping)
    out = torch.zeros(q.shape[0], Q_HEADS * HEAD_DIM)
    glue.forward(layer, q, k, v, kv_cache, meta, out)
    return out.view(-1, Q_HEADS, HEAD_DIM)


def test_page_spec_is_one_packed_row_of_the_widest_layer(monkeypatch) -> None:
    monkeypatch.setattr(leank_cache, "served_leank", lambda: SERVED)
    monkeypatch.setattr(leank_cache, "attention_settings",
                        lambda: SimpleNamespace(leank_mask="set"))
    dense = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                              dtype=torch.bfloat16)
    packed = leank_cache.customize_spec(dense)
    assert SERVED.page_row_width == 48 + 16 + 32 + 3 * HEAD_DIM
    assert packed.page_size_bytes == BLOCK * SERVED.page_row_width * 2
    assert dense.page_size_bytes / packed.page_size_bytes == pytest.approx(384 / 288)


def test_mask_off_leaves_the_spec_alone(monkeypatch) -> None:
    monkeypatch.setattr(leank_cache, "attention_settings",
                        lambda: SimpleNamespace(leank_mask=None))
    dense = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                              dtype=torch.bfloat16)
    assert leank_cache.customize_spec(dense) is dense


def test_chunked_prefill_then_decode_match_the_definition() -> None:
    glue, layer, kv_cache = layer_cache()
    keep = SERVED.mask.keep[0]
    generator = torch.Generator().manual_seed(1)
    total, first_chunk = 40, 23
    q = torch.randn(total + 1, Q_HEADS, HEAD_DIM, generator=generator)
    k = torch.randn(total + 1, KV_HEADS, HEAD_DIM, generator=generator) * 2
    v = torch.randn(total + 1, KV_HEADS, HEAD_DIM, generator=generator)
    row = [7, 2, 9]

    got = run_step(glue, layer, kv_cache, q[:first_chunk], k[:first_chunk], v[:first_chunk],
                   metadata([first_chunk], [first_chunk], [row]), slots(row, 0, first_chunk))
    expected = masked_dense_attention(q[:first_chunk], k[:first_chunk], v[:first_chunk],
                                      torch.ones_like(keep), causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # Second chunk: earlier tokens only as the pruned cache holds them, its own keys full.
    chunk = slice(first_chunk, total)
    got = run_step(glue, layer, kv_cache, q[chunk], k[chunk], v[chunk],
                   metadata([total - first_chunk], [total], [row]),
                   slots(row, first_chunk, total - first_chunk))
    mixed = torch.cat([k[:first_chunk] * keep, k[chunk]])
    expected = masked_dense_attention(q[chunk], mixed, v[:total], torch.ones_like(keep),
                                      causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # Decode: every key (its own too) on the kept channels.
    got = run_step(glue, layer, kv_cache, q[total:], k[total:], v[total:],
                   metadata([1], [total + 1], [row]), slots(row, total, 1))
    expected = masked_dense_attention(q[total:], k, v, keep, causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shared_prefix_block_and_reused_block_keep_correct_value_sums() -> None:
    glue, layer, kv_cache = layer_cache()
    keep = SERVED.mask.keep[0]
    generator = torch.Generator().manual_seed(2)
    k = torch.randn(2 * BLOCK + 4, KV_HEADS, HEAD_DIM, generator=generator)
    v = torch.randn(2 * BLOCK + 4, KV_HEADS, HEAD_DIM, generator=generator)
    q = torch.randn(2, Q_HEADS, HEAD_DIM, generator=generator)
    # Block 6 first holds stale tokens of a finished request (B reuses it below)...
    run_step(glue, layer, kv_cache, q[:1].expand(BLOCK, -1, -1), k[:BLOCK] * 3, v[:BLOCK] * 3,
             metadata([BLOCK], [BLOCK], [[6]]), slots([6], 0, BLOCK))
    # ...then sequence A fills blocks 4 (full: a cacheable prefix) and 5.
    run_step(glue, layer, kv_cache, q[:1].expand(BLOCK + 3, -1, -1), k[:BLOCK + 3],
             v[:BLOCK + 3], metadata([BLOCK + 3], [BLOCK + 3], [[4, 5]]),
             slots([4, 5], 0, BLOCK + 3))
    # Sequence B hits A's full block 4 in the prefix cache and writes its tail to block 6
    # from offset 0: the stale sum must not survive.
    tail = slice(2 * BLOCK, 2 * BLOCK + 4)
    run_step(glue, layer, kv_cache, q[:1].expand(4, -1, -1), k[tail], v[tail],
             metadata([4], [BLOCK + 4], [[4, 6]]), slots([4, 6], BLOCK, 4))
    got = run_step(glue, layer, kv_cache, q[1:], k[:1], v[:1],
                   metadata([1], [BLOCK + 5], [[4, 6]]), slots([4, 6], BLOCK + 4, 1))
    keys = torch.cat([k[:BLOCK], k[tail], k[:1]])
    values = torch.cat([v[:BLOCK], v[tail], v[:1]])
    expected = masked_dense_attention(q[1:], keys, values, keep, causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def masked_definition(q, keys, values, allowed):
    """Dense attention over ``keys`` (GQA) with ``allowed`` bool [q, keys] as the only mask."""
    group = Q_HEADS // KV_HEADS
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) / HEAD_DIM ** 0.5
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_trianglemix_prefill_over_the_pruned_pages_matches_the_masked_definition(layer_index):
    """TriangleMix + LeanK: a sparse layer's prefill keeps the pattern's keys only (sinks,
    window, the whole prompt's last rows), earlier chunks read on the kept channels. Layer 1
    has no fully pruned head: every row must match. Layer 0's fully pruned head keeps its
    prefix whole (no per-token V), so there only its last rows, which keep every key, and the
    live heads are compared."""
    from attention_backends.patterns.triangle import TrianglePattern

    glue = LeanKLayer(SERVED, Q_HEADS)
    layer = SimpleNamespace(layer_name=f"model.layers.{layer_index}.self_attn.attn")
    kv_cache = torch.full((12, 1, BLOCK, SERVED.page_row_width), float("nan"))
    keep = SERVED.mask.keep[layer_index]
    pattern = TrianglePattern(sink_tokens=2, window_tokens=6, last_q_tokens=4)
    generator = torch.Generator().manual_seed(3)
    total, first_chunk = 40, 23
    q = torch.randn(total, Q_HEADS, HEAD_DIM, generator=generator)
    k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator) * 2
    v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator)
    row = [7, 2, 9]
    steps = [(0, first_chunk), (first_chunk, total)]
    for begin, end in steps:
        glue.write(layer, k[begin:end], v[begin:end], kv_cache, slots(row, begin, end - begin))
        out = torch.zeros(end - begin, Q_HEADS * HEAD_DIM)
        decode_rows, sparse_rows = glue.forward(
            layer, q[begin:end], k[begin:end], v[begin:end], kv_cache,
            metadata([end - begin], [end], [row]), out, pattern, [total])
        assert (decode_rows, sparse_rows) == (0, end - begin)
        got = out.view(-1, Q_HEADS, HEAD_DIM)
        keys = torch.cat([k[:begin] * keep, k[begin:end]])
        allowed = pattern.token_mask(torch.arange(begin, end), torch.arange(end), total)
        expected = masked_definition(q[begin:end], keys, v[:end], allowed)
        compared = torch.ones(end - begin, Q_HEADS, dtype=torch.bool)
        group = Q_HEADS // KV_HEADS
        for head in LayerLayout(keep).pruned_heads if begin else []:
            compared[: total - pattern.last_q_tokens - begin, head * group:(head + 1) * group] = 0
        torch.testing.assert_close(got[compared], expected[compared], rtol=1e-5, atol=1e-5)
        # the pattern drops keys here: without it the middle rows of the chunk change
        dense = torch.zeros_like(out)
        glue.forward(layer, q[begin:end], k[begin:end], v[begin:end], kv_cache,
                     metadata([end - begin], [end], [row]), dense)
        middle = slice(8, end - begin - pattern.last_q_tokens)  # past sinks + window
        assert (dense.view(-1, Q_HEADS, HEAD_DIM)[middle] - got[middle]).abs().max() > 1e-2
