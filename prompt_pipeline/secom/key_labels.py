"""Keep/drop labels for SeCom's compressed retrieval keys (issue 21), and the compressor the
memory uses at serving time.

SeCom compresses each memory unit with LLMLingua-2 before indexing it ("compression as
denoising": filler and function words out, content in). LLMLingua-2's labels come from
GPT-4 compressions of MeetingBank transcripts; no such teacher runs here (no hub, no large
model), so the labels come from a rule that states what the denoising is meant to do:

- a word is kept when it is a word (not punctuation), not an English function word
  (`STOPWORDS`), not a role marker (`[user]`, `[assistant]`), and not boilerplate: its
  document frequency over the training corpus' exchanges is at most `max_df` (generic
  replies such as "That sounds good." recur in a large share of exchanges); numbers are
  always kept (as `force_digits` does at serving time);
- everything else is dropped.

The token classifier (`prompt_pipeline/token_classifier/`, compact encoder) is trained on
these labels over generated conversations (`benchmarks/secom_train_keys.py`, a corpus seed
the benchmarks do not use) and applied in target-rate mode, so it *ranks* words by learned
keep-probability in context and keeps a fixed share of pieces, digits forced. The rule uses
no answer or question: it cannot leak which word a question asks for, but the training and
benchmark corpora share the generator's vocabulary, which flatters the classifier relative
to real conversations (said wherever its numbers are reported).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from prompt_pipeline.token_classifier.words import split_words

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts" / "keys-compact"
ROLE_MARKERS = {"user", "assistant"}
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its
itself just let me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
s t d ll m re ve also really much many still even well yes ok okay oh
""".split())
_WORD = re.compile(r"\w+")


def word_key(word: str) -> str:
    return word.lower()


def document_frequency(texts: Iterable[str]) -> dict[str, float]:
    """Share of ``texts`` each (lower-cased) word occurs in."""
    counts: Counter[str] = Counter()
    total = 0
    for text in texts:
        total += 1
        counts.update({word_key(w) for w in _WORD.findall(text)})
    return {word: count / max(total, 1) for word, count in counts.items()}


def keep_spans(text: str, df: dict[str, float], max_df: float) -> tuple[tuple[int, int], ...]:
    """Character spans of the words the rule keeps in ``text``."""
    words = split_words(text)
    spans = []
    for start, end in words.spans:
        word = text[start:end]
        if not _WORD.fullmatch(word):
            continue  # punctuation
        key = word_key(word)
        before = text[start - 1] if start else ""
        if key in ROLE_MARKERS and before == "[":
            continue
        if not key.isdigit() and (key in STOPWORDS or df.get(key, 0.0) > max_df):
            continue
        spans.append((start, end))
    return tuple(spans)


def labelled(texts: Sequence[str], df: dict[str, float], max_df: float) -> list:
    """Training samples in the shape the shared trainer takes (SecurityLingua's Sample)."""
    from prompt_pipeline.securitylingua.generator import Sample

    return [Sample(text, "", keep_spans(text, df, max_df), "secom_keys", False, "secom")
            for text in texts]
