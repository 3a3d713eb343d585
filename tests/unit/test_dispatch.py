"""Layer names and prefill/decode splits used by the vLLM glue."""

from __future__ import annotations

import pytest
import torch

from attention_backends.dispatch import layer_index_from_name, split_prefill_decode


@pytest.mark.parametrize(("name", "index"), [
    ("model.layers.0.self_attn.attn", 0),
    ("model.layers.17.self_attn.attn", 17),
    ("language_model.model.layers.29.self_attn.attn", 29),
])
def test_layer_index_is_read_from_the_layer_name(name: str, index: int) -> None:
    assert layer_index_from_name(name) == index


def test_layer_name_without_index_is_rejected() -> None:
    with pytest.raises(ValueError):
        layer_index_from_name("model.norm")


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


def test_split_of_pure_prefill_has_no_decode() -> None:
    split = split_prefill_decode(torch.tensor([0, 5], dtype=torch.int32),
                                 torch.tensor([5], dtype=torch.int32),
                                 torch.zeros(1, 1, dtype=torch.int32))
    assert split.decode is None and split.prefill.num_seqs == 1
