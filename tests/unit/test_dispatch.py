"""Prefill/decode splits used by the vLLM glue of both backends."""

from __future__ import annotations

import torch

from attention_backends.dispatch import pattern_for_sub_batch, split_prefill_decode
from attention_backends.kernels import sparse_prefill_ref
from attention_backends.kernels.paged_inputs import make_paged_prefill_batch
from attention_backends.patterns import TrianglePattern


def test_split_separates_interleaved_prefills_and_decodes() -> None:
    # seq0 decode (1 token), seq1 prefill (3), seq2 decode (1), seq3 prefill (2)
    query_start_loc = torch.tensor([0, 1, 4, 5, 7], dtype=torch.int32)
    seq_lens = torch.tensor([10, 3, 20, 6], dtype=torch.int32)
    block_table = torch.arange(8, dtype=torch.int32).reshape(4, 2)
    split = split_prefill_decode(query_start_loc, seq_lens, block_table)
    assert split.prefill.token_rows.tolist() == [1, 2, 3, 5, 6]
    assert split.prefill.query_start_loc.tolist() == [0, 3, 5]
    assert split.prefill.seq_lens.tolist() == [3, 6]
    assert split.prefill.block_table.tolist() == [[2, 3], [6, 7]]
    assert split.decode.token_rows.tolist() == [0, 4]
    assert split.decode.seq_lens.tolist() == [10, 20]
    assert split.decode.max_query_len == 1
    assert split.prefill.row_range is None and split.decode.row_range is None  # interleaved


def test_split_carries_each_prefills_prompt_length() -> None:
    # seq1 is a non-final 3-token chunk of a 4000-token prompt; seq3 a final chunk
    split = split_prefill_decode(
        torch.tensor([0, 1, 4, 5, 7], dtype=torch.int32),
        torch.tensor([10, 3, 20, 6], dtype=torch.int32),
        torch.arange(8, dtype=torch.int32).reshape(4, 2),
        prompt_lens=torch.tensor([8, 4000, 15, 6], dtype=torch.int32),
    )
    assert split.prefill.prompt_lens.tolist() == [4000, 6]
    assert split.prefill.prompt_lens.dtype == torch.int32
    # last 4 prompt rows: none in seq1's chunk (positions 0-2 of 4000), all 2 of seq3's
    assert split.prefill.rows_in_last(4) == 2
    assert split.prefill.rows_in_last(4000) == 5


def test_without_prompt_lengths_the_chunk_end_stands_in() -> None:
    split = split_prefill_decode(torch.tensor([0, 4], dtype=torch.int32),
                                 torch.tensor([9], dtype=torch.int32),
                                 torch.zeros(1, 1, dtype=torch.int32))
    assert split.prefill.prompt_lens.tolist() == [9]


def test_padding_sequences_belong_to_neither_group() -> None:
    # CUDA-graph padding: trailing sequences with no new token
    split = split_prefill_decode(torch.tensor([0, 1, 3, 3, 3], dtype=torch.int32),
                                 torch.tensor([5, 7, 0, 0], dtype=torch.int32),
                                 torch.zeros(4, 2, dtype=torch.int32))
    assert split.decode.token_rows.tolist() == [0]
    assert split.prefill.token_rows.tolist() == [1, 2]


def test_split_of_pure_prefill_has_no_decode() -> None:
    split = split_prefill_decode(torch.tensor([0, 5], dtype=torch.int32),
                                 torch.tensor([5], dtype=torch.int32),
                                 torch.zeros(1, 1, dtype=torch.int32))
    assert split.decode is None and split.prefill.num_seqs == 1
    assert split.prefill.row_range == (0, 5)


def _chunk_split(chunk_start: int, chunk_end: int, prompt_len: int):
    return split_prefill_decode(torch.tensor([0, chunk_end - chunk_start], dtype=torch.int32),
                                torch.tensor([chunk_end], dtype=torch.int32),
                                torch.zeros(1, 1, dtype=torch.int32),
                                prompt_lens=torch.tensor([prompt_len], dtype=torch.int32))


def test_chunks_without_last_rows_launch_no_last_rows() -> None:
    pattern = TrianglePattern(sink_tokens=4, window_tokens=16, last_q_tokens=32)
    early = _chunk_split(0, 64, 200).prefill  # positions 0-63 of a 200-token prompt
    touching = _chunk_split(150, 169, 200).prefill  # position 168 is a last row
    assert pattern_for_sub_batch(pattern, early).last_q_tokens == 0
    assert pattern_for_sub_batch(pattern, touching) is pattern
    dense = TrianglePattern(last_q_tokens=0)
    assert pattern_for_sub_batch(dense, early) is dense


def _reference(batch, pattern) -> torch.Tensor:
    return sparse_prefill_ref(batch.query, batch.key_cache, batch.value_cache,
                              batch.block_table, batch.query_start_loc, batch.seq_lens,
                              batch.prompt_lens, pattern, 0.125)


def test_pattern_without_last_rows_computes_the_same_rows() -> None:
    # A non-final chunk of a longer prompt: the pattern with and without last rows must
    # give identical outputs on it, row by row (else skipping the last-row launch is wrong).
    generator = torch.Generator().manual_seed(7)
    batch = make_paged_prefill_batch([96, 130], query_lens=[40, 64], prompt_lens=[300, 400],
                                     generator=generator)
    split = split_prefill_decode(batch.query_start_loc, batch.seq_lens, batch.block_table,
                                 batch.prompt_lens)
    pattern = TrianglePattern(sink_tokens=4, window_tokens=16, last_q_tokens=32)
    chosen = pattern_for_sub_batch(pattern, split.prefill)
    assert chosen.last_q_tokens == 0
    same, full = _reference(batch, chosen), _reference(batch, pattern)
    assert (same - full).abs().amax(dim=(1, 2)).max() < 1e-5  # every row (fp32 rounding)
    # the negative control: in the final chunk the last rows differ without them
    final = make_paged_prefill_batch([300], query_lens=[64], generator=generator)
    per_row = (_reference(final, pattern) - _reference(final, chosen)).abs().amax(dim=(1, 2))
    assert (per_row[-32:] > 1e-3).all() and (per_row[:-32] < 1e-5).all()
