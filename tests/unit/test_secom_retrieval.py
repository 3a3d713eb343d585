"""SeCom retrieval: BM25, embeddings and their rank fusion; budgets; conversation order."""

from __future__ import annotations

import numpy as np

from prompt_pipeline.secom.retrieval import Bm25Index, UnitIndex, render_context, rrf, select
from prompt_pipeline.secom.store import Exchange, MemoryUnit
from prompt_pipeline.secom.units import segment_units, turn_units

UNITS = [
    MemoryUnit("segment", 0, 1, "We talked about the hiking trip to Norway in June.",
               "hiking Norway June"),
    MemoryUnit("segment", 2, 3, "My sister's birthday cake was chocolate.",
               "sister birthday chocolate cake"),
    MemoryUnit("segment", 4, 6, "The new laptop has 32 GB of memory.", "laptop 32 GB memory"),
]


def _bag_of_words(texts: list[str]) -> np.ndarray:
    vocab = sorted({w for t in texts + ["cake"] for w in t.lower().split()})
    rows = np.array([[t.lower().split().count(w) for w in vocab] for t in texts], dtype=float)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


def test_bm25_ranks_the_unit_with_the_query_words_first() -> None:
    scores = Bm25Index([u.key_text for u in UNITS]).scores("what cake for my sister?")
    assert int(np.argmax(scores)) == 1
    assert Bm25Index([u.key_text for u in UNITS]).scores("zzz qqq").tolist() == [0, 0, 0]


def test_rank_fusion_rewards_agreement() -> None:
    fused = rrf(np.array([3.0, 2.0, 1.0]), np.array([1.0, 3.0, 2.0]))
    assert int(np.argmax(fused)) == 1  # ranks 2nd and 1st beat 1st and 3rd


def test_fused_index_and_selection_in_conversation_order() -> None:
    index = UnitIndex.build(UNITS, _bag_of_words)
    query = "memory of the laptop and the hiking trip"
    scores = index.scores(query, "bm25", None)
    chosen = select(UNITS, scores, top_k=2)
    assert chosen == [0, 2]  # best two, returned in conversation order
    assert render_context([UNITS[i] for i in chosen]).count("[Memory") == 2


def test_token_budget_skips_units_that_do_not_fit() -> None:
    scores = np.array([3.0, 1.0, 2.0])  # units of 10, 6 and 8 words
    assert select(UNITS, scores, token_budget=18) == [0, 2]  # 10 + 8; the 6 would exceed
    assert select(UNITS, scores, token_budget=17) == [0, 1]  # the 8 does not fit, the 6 does
    assert select(UNITS, scores, token_budget=5) == []


def test_units_at_three_granularities() -> None:
    exchanges = [Exchange(i, f"r{i}", f"q{i}", f"a{i}", 0.0) for i in range(4)]
    assert [(u.first_exchange, u.last_exchange) for u in turn_units(exchanges)] == [
        (0, 0), (1, 1), (2, 2), (3, 3)]
    segments = segment_units(exchanges, [(0, 2), (3, 3)], compress=str.upper)
    assert segments[0].text.count("[user]") == 3 and segments[0].key_text.isupper()


TEXTS = ["the dog is called Biscuit", "a flight to Lisbon in June", "", "dog dog park",
         "chocolate cake for the birthday", "the dog and the cake", "June is warm in Lisbon"]
QUERIES = ["what is the dog called?", "lisbon june flight", "cake cake", "zzz", "the"]


def test_bm25_scores_equal_bm25s_lucene_scores() -> None:
    import bm25s

    from prompt_pipeline.secom.retrieval import tokenize

    reference = bm25s.BM25()
    reference.index([tokenize(text) or ["_"] for text in TEXTS], show_progress=False)
    ours = Bm25Index(TEXTS)
    for query in QUERIES:
        words = [w for w in tokenize(query) if w in reference.vocab_dict]
        expected = reference.get_scores(words) if words else np.zeros(len(TEXTS))
        np.testing.assert_allclose(ours.scores(query), expected, rtol=1e-5, atol=1e-7)


def test_bm25_grown_and_truncated_equals_one_built_at_once() -> None:
    grown = Bm25Index(TEXTS[:3])
    grown.extend(["an open segment about something else", *TEXTS[3:5]])
    grown.truncate(3)  # the open tail is segmented again
    grown.extend(TEXTS[3:])
    whole = Bm25Index(TEXTS)
    for query in QUERIES:
        np.testing.assert_allclose(grown.scores(query), whole.scores(query), rtol=1e-6)


def test_bm25_truncates_documents_that_share_a_word_only_among_themselves() -> None:
    grown = Bm25Index(TEXTS[:3])
    grown.extend(["zebra crossing", "zebra stripes"])  # "zebra" in no kept document
    grown.truncate(3)
    grown.extend(TEXTS[3:])
    whole = Bm25Index(TEXTS)
    for query in [*QUERIES, "zebra"]:
        np.testing.assert_allclose(grown.scores(query), whole.scores(query), rtol=1e-6)


def test_unit_index_replaces_only_the_tail() -> None:
    vectors = _bag_of_words([u.key_text for u in UNITS])
    index = UnitIndex(UNITS[:2], vectors[:2])
    index.replace_from(1, UNITS[1:], vectors[1:])
    whole = UnitIndex(UNITS, vectors)
    assert index.units == whole.units
    for method in ("bm25", "embedding", "fused"):
        np.testing.assert_allclose(index.scores("chocolate laptop", method, vectors[2]),
                                   whole.scores("chocolate laptop", method, vectors[2]))
    assert index.position_of(2) == 1 and index.position_of(4) == 2
