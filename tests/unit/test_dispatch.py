"""Prefill/decode splits used by the vLLM glue of both backends."""

from __future__ import annotations

import torch

from attention_backends.dispatch import split_prefill_decode


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
