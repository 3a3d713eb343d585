"""Retrieve memory units for a query (SeCom section 2.3): BM25 over the units' key texts,
cosine over their MiniLM embeddings, or both fused by reciprocal rank (RRF, k = 60). The
chosen units go to the generator as their original text, in conversation order."""

from __future__ import annotations

import bisect
import math
import re
import threading
from array import array
from collections.abc import Callable, Sequence

import numpy as np

from prompt_pipeline.secom.store import MemoryUnit

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2

RRF_K = 60
_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return [token.lower() for token in _TOKEN.findall(text)]


class Bm25Index:
    """BM25 (Lucene variant, k1 = 1.5, b = 0.75, as bm25s scores it) that can grow and drop
    its last documents: a memory write changes only the conversation's open tail, so the
    index must follow in time proportional to that tail, not rebuild over every unit (a
    bm25s rebuild was part of the 1.9 s write at 10,000 units).

    Postings per word hold (document, term frequency) in document order, so dropping the
    documents from position p on truncates each affected word's postings. N, document
    frequencies and the mean length enter the scores at query time.
    """

    def __init__(self, texts: Sequence[str] = (), k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._postings: dict[str, tuple[array, array]] = {}  # word -> (documents, counts)
        self._lengths = array("f")  # words per document
        self._words: list[list[str]] = []  # distinct words per document, to drop it again
        self.extend(texts)

    @property
    def size(self) -> int:
        return len(self._lengths)

    def extend(self, texts: Sequence[str]) -> None:
        for text in texts:
            document = len(self._lengths)
            words = tokenize(text) or ["_"]  # bm25s' placeholder for an empty document
            counts: dict[str, int] = {}
            for word in words:
                counts[word] = counts.get(word, 0) + 1
            for word, count in counts.items():
                postings = self._postings.get(word)
                if postings is None:
                    postings = self._postings[word] = (array("i"), array("f"))
                postings[0].append(document)
                postings[1].append(count)
            self._lengths.append(len(words))
            self._words.append(list(counts))

    def truncate(self, size: int) -> None:
        """Drop documents ``size`` and after."""
        # each word once: two dropped documents sharing a word would find its postings
        # already gone on the second visit
        for word in {word for words in self._words[size:] for word in words}:
            documents, counts = self._postings[word]
            keep = bisect.bisect_left(documents, size)
            if keep == 0:
                del self._postings[word]
            else:
                del documents[keep:], counts[keep:]
        del self._lengths[size:], self._words[size:]

    def scores(self, query: str) -> np.ndarray:
        """Float ``[size]``; zeros for a query with no indexed word."""
        total = np.zeros(self.size, dtype=np.float32)
        if not self.size:
            return total
        lengths = np.frombuffer(self._lengths, dtype=np.float32)
        norm = self.k1 * (1 - self.b + self.b * lengths / lengths.mean())
        for word in tokenize(query):  # a repeated query word counts again, as in bm25s
            postings = self._postings.get(word)
            if postings is None:
                continue
            documents = np.frombuffer(postings[0], dtype=np.int32)
            counts = np.frombuffer(postings[1], dtype=np.float32)
            idf = math.log(1 + (self.size - len(documents) + 0.5) / (len(documents) + 0.5))
            total[documents] += idf * counts / (counts + norm[documents])
        return total


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


class UnitIndex:
    """The retrieval index of one conversation's units, in conversation order. A write
    replaces only the units from the open tail on (`replace_from`); recall and writes may
    run in different threads, so both go through the index's lock."""

    def __init__(self, units: Sequence[MemoryUnit], vectors: np.ndarray) -> None:
        if len(vectors) != len(units):
            raise ValueError("one vector per unit")
        self.units: list[MemoryUnit] = []
        self.bm25 = Bm25Index()
        # Rows [0, len(units)) are in use; the rest is room to grow without a copy per write.
        self._vectors = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        self._lock = threading.Lock()
        self.replace_from(0, units, vectors)

    @property
    def embeddings(self) -> np.ndarray:
        return self._vectors[: len(self.units)]

    @classmethod
    def build(cls, units: Sequence[MemoryUnit],
              embed: Callable[[list[str]], np.ndarray]) -> UnitIndex:
        keys = [unit.key_text for unit in units]
        vectors = embed(keys) if keys else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return cls(units, vectors)

    @classmethod
    def from_vectors(cls, units: Sequence[MemoryUnit],
                     vectors: Sequence[np.ndarray]) -> UnitIndex:
        """From key embeddings computed earlier (stored with the units): no model call."""
        matrix = (np.stack(vectors).astype(np.float32) if len(vectors)
                  else np.zeros((0, EMBEDDING_DIM), dtype=np.float32))
        return cls(units, matrix)

    def replace_from(self, position: int, units: Sequence[MemoryUnit],
                     vectors: np.ndarray) -> None:
        """Units ``position`` and after become ``units`` (key embeddings ``vectors``)."""
        with self._lock:
            size = position + len(units)
            if size > len(self._vectors):
                dim = vectors.shape[1] if position == 0 else self._vectors.shape[1]
                grown = np.zeros((max(size, 2 * len(self._vectors), 16), dim),
                                 dtype=np.float32)
                if position:
                    grown[:position] = self._vectors[:position]
                self._vectors = grown
            if len(units):
                self._vectors[position:size] = vectors
            self.bm25.truncate(position)
            self.bm25.extend([unit.key_text for unit in units])
            self.units = [*self.units[:position], *units]

    def position_of(self, first_exchange: int) -> int:
        """How many units start before exchange ``first_exchange``."""
        return bisect.bisect_left(self.units, first_exchange, key=lambda u: u.first_exchange)

    def scores(self, query: str, method: str, query_vector: np.ndarray | None) -> np.ndarray:
        with self._lock:
            return self._scores(query, method, query_vector)

    def _scores(self, query: str, method: str, query_vector: np.ndarray | None) -> np.ndarray:
        if method == "bm25":
            return self.bm25.scores(query)
        dense = self.embeddings @ query_vector if len(self.units) else np.zeros(0)
        if method == "embedding":
            return dense
        if method == "fused":
            return rrf(self.bm25.scores(query), dense)
        raise ValueError(f"unknown retrieval method {method!r}")

    def score_units(self, query: str, method: str,
                    query_vector: np.ndarray | None) -> tuple[list[MemoryUnit], np.ndarray]:
        """The units and their scores, read together: a write may replace the tail units
        between two separate reads."""
        with self._lock:
            return list(self.units), self._scores(query, method, query_vector)


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


CONTEXT_HEADER = "Relevant parts of your earlier conversation with this user:"


def render_context(units: Sequence[MemoryUnit], header: str = CONTEXT_HEADER) -> str:
    """The memory block given to the generator (the units' original text)."""
    if not units:
        return ""
    parts = [f"[Memory {number + 1}, exchanges {unit.first_exchange}-{unit.last_exchange}]\n"
             f"{unit.text}" for number, unit in enumerate(units)]
    return f"{header}\n\n" + "\n\n".join(parts)
