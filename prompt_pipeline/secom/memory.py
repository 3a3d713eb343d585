"""One conversation memory service: remember exchanges, recall units for a query (SeCom).

`remember` runs after a response (never on the request path): it embeds and stores the
exchange, re-segments the conversation over the stored exchange embeddings (TextTiling), and
rebuilds the units, embedding only units whose key text changed, then caches the retrieval
index. `recall` runs on the request path: the cached index (or one built from the stored
vectors), the query embedded once, scores fused, units chosen by top-k and a token budget,
returned in conversation order.

Writes to one conversation are serialised (a striped lock), so two concurrent writers never
rebuild units from different views of the exchanges. A crash between storing an exchange
and rebuilding the units leaves stale units: `recall` sees that (fewer exchanges covered
than stored) and rebuilds once.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from prompt_pipeline.secom.retrieval import UnitIndex, select
from prompt_pipeline.secom.segmentation import segment_by_embeddings
from prompt_pipeline.secom.store import (
    ConversationKey,
    Exchange,
    MemoryStore,
    MemoryUnit,
)
from prompt_pipeline.secom.units import segment_units, turn_units

Embed = Callable[[list[str]], np.ndarray]
Compress = Callable[[str], str]
LOCK_STRIPES = 64
CACHED_INDEXES = 1024  # conversations whose index stays in memory (least recently used go)


@dataclass(frozen=True)
class RecallSettings:
    granularity: str = "segment"  # "segment" or "turn"
    method: str = "fused"  # "bm25", "embedding" or "fused"
    top_k: int | None = 3
    token_budget: int | None = 600  # words of unit text injected at most


def exchange_text(user_text: str, assistant_text: str) -> str:
    return f"[user]: {user_text}\n[assistant]: {assistant_text}"


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def _vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


class ConversationMemory:
    def __init__(self, store: MemoryStore, embed: Embed, compress: Compress | None = None,
                 settings: RecallSettings | None = None) -> None:
        self.store = store
        self.embed = embed
        self.compress = compress
        self.settings = settings or RecallSettings()
        self._indexes: OrderedDict[ConversationKey, UnitIndex] = OrderedDict()
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def _writer_lock(self, key: ConversationKey) -> threading.Lock:
        digest = zlib.crc32(f"{key.tenant}\0{key.user}\0{key.conversation}".encode())
        return self._stripes[digest % LOCK_STRIPES]

    def remember(self, key: ConversationKey, request_id: str, user_text: str,
                 assistant_text: str) -> bool:
        """Store one finished exchange and rebuild the units; False for a repeated id."""
        vector = self.embed([exchange_text(user_text, assistant_text)])[0]
        with self._writer_lock(key):
            if not self.store.add_exchange(key, request_id, user_text, assistant_text,
                                           _blob(vector)):
                return False
            self._rebuild(key)
        return True

    def _exchange_vectors(self, key: ConversationKey,
                          exchanges: list[Exchange]) -> np.ndarray:
        stored = self.store.exchange_vectors(key)
        missing = [i for i, blob in enumerate(stored) if blob is None]
        filled = self.embed([exchanges[i].text for i in missing]) if missing else []
        vectors = [_vector(blob) if blob is not None else None for blob in stored]
        for i, vector in zip(missing, filled, strict=True):
            vectors[i] = np.asarray(vector, dtype=np.float32)
        return np.stack(vectors) if vectors else np.zeros((0, 384), dtype=np.float32)

    def _rebuild(self, key: ConversationKey) -> UnitIndex:
        """Units from all stored exchanges; unchanged units keep their key text and vector."""
        kind = self.settings.granularity
        previous = {unit.text: unit for unit in self.store.units(key, kind)}
        exchanges = self.store.exchanges(key)
        if kind == "turn":
            spans = [(i, i) for i in range(len(exchanges))]
        else:
            spans = segment_by_embeddings(self._exchange_vectors(key, exchanges))
        units = []
        for first, last in spans:
            old = previous.get("\n".join(e.text for e in exchanges[first:last + 1]))
            if old is not None and old.vector is not None:
                units.append(replace(old, first_exchange=first, last_exchange=last))
                continue
            made = (turn_units(exchanges[first:first + 1], self.compress)[0] if kind == "turn"
                    else segment_units(exchanges, [(first, last)], self.compress)[0])
            units.append(made)
        fresh = [i for i, unit in enumerate(units) if unit.vector is None]
        if fresh:
            vectors = self.embed([units[i].key_text for i in fresh])
            for i, vector in zip(fresh, vectors, strict=True):
                units[i] = replace(units[i], vector=_blob(vector))
        self.store.replace_units(key, kind, units)
        index = UnitIndex.from_vectors(units, [_vector(u.vector) for u in units if u.vector])
        self._cache(key, index)
        return index

    def _cache(self, key: ConversationKey, index: UnitIndex) -> None:
        with self._lock:
            self._indexes[key] = index
            self._indexes.move_to_end(key)
            while len(self._indexes) > CACHED_INDEXES:
                self._indexes.popitem(last=False)

    def _index(self, key: ConversationKey) -> UnitIndex:
        with self._lock:
            index = self._indexes.get(key)
            if index is not None:
                self._indexes.move_to_end(key)
                return index
        units = self.store.units(key, self.settings.granularity)
        covered = units[-1].last_exchange + 1 if units else 0
        if covered != self.store.exchange_count(key) or any(u.vector is None for u in units):
            with self._writer_lock(key):  # after a crash mid-write, or an old schema
                return self._rebuild(key)
        index = UnitIndex.from_vectors(units, [_vector(u.vector) for u in units if u.vector])
        self._cache(key, index)
        return index

    def recall(self, key: ConversationKey, query: str) -> list[MemoryUnit]:
        """The conversation's units most relevant to ``query``, in conversation order."""
        index = self._index(key)
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

    def forget_user(self, tenant: str, user: str) -> None:
        with self._lock:
            for key in [k for k in self._indexes if k.tenant == tenant and k.user == user]:
                del self._indexes[key]
