"""Cutting a long token sequence into encoder-sized chunks at sentence ends.

Every token lands in exactly one chunk (nothing is truncated). A chunk ends, in order of
preference, after the last token of a sentence-ending word, after the last token of any
word, or (only for a single word longer than a chunk) at the size limit.
"""

from __future__ import annotations

import numpy as np


def plan_chunks(token_word_ids: np.ndarray, sentence_end_words: np.ndarray,
                max_tokens: int) -> list[tuple[int, int]]:
    """[start, end) token ranges covering 0..len(token_word_ids), each <= max_tokens long.

    token_word_ids: int array [num_tokens], non-decreasing word index of each token.
    sentence_end_words: bool array [num_words], True where a chunk may end after the word.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    num_tokens = len(token_word_ids)
    if num_tokens == 0:
        return []
    # cut_after[t]: a chunk may end after token t (t is its word's last token).
    word_last = np.ones(num_tokens, dtype=bool)
    word_last[:-1] = token_word_ids[1:] != token_word_ids[:-1]
    sentence_last = word_last & sentence_end_words[token_word_ids]
    word_cuts = np.flatnonzero(word_last) + 1  # candidate chunk ends (exclusive)
    sentence_cuts = np.flatnonzero(sentence_last) + 1

    chunks = []
    start = 0
    while start < num_tokens:
        limit = start + max_tokens
        if limit >= num_tokens:
            end = num_tokens
        else:
            end = _last_cut(sentence_cuts, start, limit) or _last_cut(word_cuts, start, limit) \
                or limit
        chunks.append((start, end))
        start = end
    return chunks


def _last_cut(cuts: np.ndarray, start: int, limit: int) -> int | None:
    """The largest cut in (start, limit], or None."""
    index = int(np.searchsorted(cuts, limit, side="right")) - 1
    if index >= 0 and cuts[index] > start:
        return int(cuts[index])
    return None
