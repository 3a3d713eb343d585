"""Words: the unit the classifier keeps or drops, with their character spans.

A word is a run of word characters or a single other non-space character (so "bomb." is two
words, "bomb" and "."), the way LLMLingua-2's XLM-R rules start a new word at punctuation.
Spans index the original text, so a kept selection can be rebuilt with the original spacing
and a label for each word can be read off character spans of the underlying instruction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# A word ending a sentence: chunks are cut after these (LLMLingua-2 cuts at "." and "\n").
SENTENCE_END_WORDS = frozenset({".", "!", "?", ";", "。", "！", "？"})


@dataclass(frozen=True)
class Words:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character offsets of each word

    @property
    def strings(self) -> list[str]:
        return [self.text[start:end] for start, end in self.spans]

    def __len__(self) -> int:
        return len(self.spans)

    def sentence_ends(self) -> list[bool]:
        """True for a word after which a chunk may be cut: sentence punctuation or a newline."""
        ends = []
        for index, (start, end) in enumerate(self.spans):
            following = self.spans[index + 1][0] if index + 1 < len(self.spans) else len(self.text)
            ends.append(self.text[start:end] in SENTENCE_END_WORDS
                        or "\n" in self.text[end:following])
        return ends

    def join(self, keep: Sequence[bool]) -> str:
        """The kept words in order, on one line. Two kept neighbours that touch in the text
        stay touching (so "don't" and "bomb." come back whole); any other gap, dropped words
        or whitespace, becomes one space."""
        parts: list[str] = []
        previous_end = -1
        previous_index = -2
        for index, ((start, end), kept) in enumerate(zip(self.spans, keep, strict=True)):
            if not kept:
                continue
            if parts and not (previous_index == index - 1 and previous_end == start):
                parts.append(" ")
            parts.append(self.text[start:end])
            previous_end, previous_index = end, index
        return "".join(parts)


def split_words(text: str) -> Words:
    return Words(text, [match.span() for match in _WORD.finditer(text)])


def words_overlapping(words: Words, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each word, whether it overlaps any of the character spans (e.g. an instruction)."""
    flags = []
    for start, end in words.spans:
        flags.append(any(start < span_end and span_start < end for span_start, span_end in spans))
    return flags
