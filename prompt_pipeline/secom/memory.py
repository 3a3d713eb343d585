"""One conversation memory service: remember exchanges, recall units for a query (SeCom).

`remember` runs after a response (never on the request path): it stores the exchange, then
rebuilds the conversation's segment units (segments found over the exchange embeddings,
within each session gap-free run) and drops the cached retrieval index. `recall` runs on the
request path: the cached index of the conversation's units, the query embedded once, scores
fused, units chosen by top-k and a token budget, returned in conversation order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prompt_pipeline.secom.retrieval import UnitIndex, select
from prompt_pipeline.secom.segmentation import segment_by_embeddings
from prompt_pipeline.secom.store import ConversationKey, MemoryStore, MemoryUnit
from prompt_pipeline.secom.units import segment_units, turn_units

Embed = Callable[[list[str]], np.ndarray]
Compress = Callable[[str], str]


@dataclass(frozen=True)
class RecallSettings:
    granularity: str = "segment"  # "segment" or "turn"
    method: str = "fused"  # "bm25", "embedding" or "fused"
    top_k: int | None = 3
    token_budget: int | None = 600  # words of unit text injected at most


class ConversationMemory:
    def __init__(self, store: MemoryStore, embed: Embed, compress: Compress | None = None,
                 settings: RecallSettings | None = None) -> None:
        self.store = store
        self.embed = embed
        self.compress = compress
        self.settings = settings or RecallSettings()
        self._indexes: dict[ConversationKey, UnitIndex] = {}
        self._lock = threading.Lock()

    def remember(self, key: ConversationKey, request_id: str, user_text: str,
                 assistant_text: str) -> bool:
        """Store one finished exchange and rebuild the units; False for a repeated id."""
        if not self.store.add_exchange(key, request_id, user_text, assistant_text):
            return False
        exchanges = self.store.exchanges(key)
        kind = self.settings.granularity
        if kind == "turn":
            units = turn_units(exchanges, self.compress)
        else:
            vectors = self.embed([exchange.text for exchange in exchanges])
            units = segment_units(exchanges, segment_by_embeddings(vectors), self.compress)
        self.store.replace_units(key, kind, units)
        with self._lock:
            self._indexes.pop(key, None)
        return True

    def recall(self, key: ConversationKey, query: str) -> list[MemoryUnit]:
        """The conversation's units most relevant to ``query``, in conversation order."""
        with self._lock:
            index = self._indexes.get(key)
        if index is None:
            index = UnitIndex.build(self.store.units(key, self.settings.granularity), self.embed)
            with self._lock:
                self._indexes[key] = index
        if not index.units:
            return []
        vector = self.embed([query])[0] if self.settings.method != "bm25" else None
        scores = index.scores(query, self.settings.method, vector)
        chosen = select(index.units, scores, top_k=self.settings.top_k,
                        token_budget=self.settings.token_budget)
        return [index.units[i] for i in chosen]

    def forget(self, key: ConversationKey) -> None:
        with self._lock:
            self._indexes.pop(key, None)
