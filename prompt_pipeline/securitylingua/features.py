"""Samples to encoder chunks with per-piece labels (LLMLingua-2's training input).

A word's label is copied to each of its pieces, as the official trainer does; [CLS] and
[SEP] get the ignore label. Long prompts are cut with the same sentence-end chunking as
inference, so training sees what serving sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from prompt_pipeline.securitylingua.generator import Sample
from prompt_pipeline.token_classifier.chunking import plan_chunks
from prompt_pipeline.token_classifier.classifier import SPECIAL_TOKENS, tokenize_words
from prompt_pipeline.token_classifier.words import split_words, words_overlapping

IGNORE = -100


@dataclass(frozen=True)
class Chunk:
    input_ids: np.ndarray  # [tokens] int64, with [CLS] ... [SEP]
    labels: np.ndarray  # [tokens] int64, 1 keep / 0 drop / IGNORE on special tokens


def sample_chunks(sample: Sample, tokenizer: Tokenizer, max_chunk_tokens: int) -> list[Chunk]:
    words = split_words(sample.text)
    word_labels = np.asarray(words_overlapping(words, sample.spans), dtype=np.int64)
    pieces = tokenize_words(tokenizer, words)
    ends = np.asarray(words.sentence_ends(), dtype=bool)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    chunks = []
    for start, end in plan_chunks(pieces.word_ids, ends, max_chunk_tokens - SPECIAL_TOKENS):
        ids = np.concatenate([[cls_id], pieces.ids[start:end], [sep_id]]).astype(np.int64)
        labels = np.concatenate([[IGNORE], word_labels[pieces.word_ids[start:end]], [IGNORE]])
        chunks.append(Chunk(ids, labels.astype(np.int64)))
    return chunks


def all_chunks(samples: Sequence[Sample], tokenizer: Tokenizer,
               max_chunk_tokens: int) -> list[Chunk]:
    return [chunk for sample in samples
            for chunk in sample_chunks(sample, tokenizer, max_chunk_tokens)]
