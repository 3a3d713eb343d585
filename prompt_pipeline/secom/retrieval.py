"""Retrieve memory units for a query (SeCom section 2.3): BM25 over the units' key texts,
cosine over their MiniLM embeddings, or both fused by reciprocal rank (RRF, k = 60). The
chosen units go to the generator as their original text, in conversation order."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from prompt_pipeline.secom.store import MemoryUnit

RRF_K = 60
_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return [token.lower() for token in _TOKEN.findall(text)]


class Bm25Index:
    """BM25 (Lucene variant, k1 = 1.5, b = 0.75) over a fixed list of texts, with bm25s."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        self.size = len(texts)
        self._index = bm25s.BM25()
        if self.size:
            self._index.index([tokenize(text) or ["_"] for text in texts], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """Float ``[len(texts)]``; zeros for a query with no indexed word."""
        if not self.size:
            return np.zeros(0, dtype=np.float32)
        words = [w for w in tokenize(query) if w in self._index.vocab_dict]
        if not words:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._index.get_scores(words), dtype=np.float32)


def ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of each entry (0 = best); ties broken by position (earlier first)."""
    order = np.argsort(-scores, kind="stable")
    result = np.empty(len(scores), dtype=np.int64)
    result[order] = np.arange(len(scores))
    return result


def rrf(*score_lists: np.ndarray) -> np.ndarray:
    """Reciprocal-rank fusion of several score vectors over the same entries."""
    fused = np.zeros(len(score_lists[0]), dtype=np.float64)
    for scores in score_lists:
        fused += 1.0 / (RRF_K + 1 + ranks(scores))
    return fused


@dataclass
class UnitIndex:
    """The retrieval index of one conversation's units (built once per unit change)."""

    units: list[MemoryUnit]
    bm25: Bm25Index
    embeddings: np.ndarray  # [n, dim] unit norm, of the key texts

    @classmethod
    def build(cls, units: Sequence[MemoryUnit],
              embed: Callable[[list[str]], np.ndarray]) -> UnitIndex:
        keys = [unit.key_text for unit in units]
        vectors = embed(keys) if keys else np.zeros((0, 384), dtype=np.float32)
        return cls(list(units), Bm25Index(keys), vectors)

    @classmethod
    def from_vectors(cls, units: Sequence[MemoryUnit],
                     vectors: Sequence[np.ndarray]) -> UnitIndex:
        """From key embeddings computed earlier (stored with the units): no model call."""
        matrix = (np.stack(vectors).astype(np.float32) if len(vectors)
                  else np.zeros((0, 384), dtype=np.float32))
        if len(matrix) != len(units):
            raise ValueError("one vector per unit")
        return cls(list(units), Bm25Index([unit.key_text for unit in units]), matrix)

    def scores(self, query: str, method: str, query_vector: np.ndarray | None) -> np.ndarray:
        if method == "bm25":
            return self.bm25.scores(query)
        dense = self.embeddings @ query_vector if len(self.units) else np.zeros(0)
        if method == "embedding":
            return dense
        if method == "fused":
            return rrf(self.bm25.scores(query), dense)
        raise ValueError(f"unknown retrieval method {method!r}")


def select(units: Sequence[MemoryUnit], scores: np.ndarray, top_k: int | None = None,
           token_budget: int | None = None,
           count_tokens: Callable[[str], int] = lambda text: len(text.split())) -> list[int]:
    """Indices of the best units, by score, up to ``top_k`` units and/or ``token_budget``
    tokens of their text; returned in conversation order."""
    chosen, used = [], 0
    for index in np.argsort(-scores, kind="stable"):
        if top_k is not None and len(chosen) >= top_k:
            break
        cost = count_tokens(units[index].text)
        if token_budget is not None and used + cost > token_budget:
            continue
        chosen.append(int(index))
        used += cost
    return sorted(chosen, key=lambda i: (units[i].first_exchange, i))


def render_context(units: Sequence[MemoryUnit]) -> str:
    """The memory block given to the generator (the units' original text)."""
    if not units:
        return ""
    parts = [f"[Memory {number + 1}, exchanges {unit.first_exchange}-{unit.last_exchange}]\n"
             f"{unit.text}" for number, unit in enumerate(units)]
    return ("Relevant parts of your earlier conversation with this user:\n\n"
            + "\n\n".join(parts))
