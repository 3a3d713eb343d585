"""One conversation memory service: remember exchanges, recall units for a query (SeCom).

A write runs after a response (never on the request path), in three steps:
1. `store_exchange`: embed the exchange and store it with its vector;
2. `open_tail` + a `TailSegmenter`: only the conversation's open tail (its last, open
   segment and the exchanges after it) is segmented again, by the served model or
   TextTiling; closed segments never change, so a write costs what the tail holds, not what
   the conversation holds (the whole-conversation rebuild took 1.9 s at 48,500 exchanges);
3. `apply_tail`: the tail's units replace the old open unit in the store and in the cached
   retrieval index; only units whose text changed are embedded.
`remember` runs the three with TextTiling (no model); the gateway stage runs step 2 through
the served model between them, off any lock.

`recall` runs on the request path: the cached index (or one built from the stored vectors),
the query embedded once, scores fused, units chosen by top-k and a token budget, returned
in conversation order.

Writes to one conversation are serialised (a striped lock) where they touch the units, and
a tail that another writer moved on meanwhile is segmented again under the lock (TextTiling).
A crash between storing an exchange and updating the units leaves exchanges no unit covers:
`recall` sees that and segments the tail once.

Erasure wins: each write carries the conversation's erase generation from when its request
arrived, and the store refuses the write (`ConversationErased`) if an erase came since. An
erase holds the conversation's writer lock (all of them for a whole user), so no write can
put erased units back into the cache after it.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from prompt_pipeline.secom.retrieval import EMBEDDING_DIM, UnitIndex, select
from prompt_pipeline.secom.segmentation import Segment, segment_by_embeddings
from prompt_pipeline.secom.segmenter import (
    Complete,
    SegmentationReport,
    Tail,
    TailSegmenter,
)
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
TAIL_CONTEXT = 2  # exchanges of the closed segment before the tail: TextTiling's window


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


@dataclass(frozen=True)
class StoredTail(Tail):
    """A tail as read from the store, with what `apply_tail` needs to check it is current."""

    exchanges: tuple[Exchange, ...] = ()
    open_unit: MemoryUnit | None = None


class ConversationMemory:
    def __init__(self, store: MemoryStore, embed: Embed, compress: Compress | None = None,
                 settings: RecallSettings | None = None,
                 segmenter: TailSegmenter | None = None) -> None:
        self.store = store
        self.embed = embed
        self.compress = compress
        self.settings = settings or RecallSettings()
        self.segmenter = segmenter or TailSegmenter(mode="embedding")
        # Each cached index with the erase generation it was built under.
        self._indexes: OrderedDict[ConversationKey, tuple[UnitIndex, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def _writer_lock(self, key: ConversationKey) -> threading.Lock:
        digest = zlib.crc32(f"{key.tenant}\0{key.user}\0{key.conversation}".encode())
        return self._stripes[digest % LOCK_STRIPES]

    # --- writes
    def remember(self, key: ConversationKey, request_id: str, user_text: str,
                 assistant_text: str, generation: int | None = None) -> bool:
        """Store one finished exchange and update the units (TextTiling); False for a
        repeated request id; `ConversationErased` if erased since ``generation``."""
        if generation is None:
            generation = self.store.generation(key)
        if not self.store_exchange(key, request_id, user_text, assistant_text, generation):
            return False
        tail = self.open_tail(key)
        self.apply_tail(key, tail, self.segments_without_model(tail), generation)
        return True

    def segments_without_model(self, tail: Tail) -> list[Segment]:
        if self.settings.granularity == "turn":
            return [(i, i) for i in range(len(tail.texts))]
        return self.segmenter.tiling(tail)

    async def segment(self, tail: Tail, complete: Complete | None) -> SegmentationReport:
        """The tail's segments from the configured segmenter (the model where it is
        first), for a write between `store_exchange` and `apply_tail`."""
        if self.settings.granularity == "turn":
            return SegmentationReport(self.segments_without_model(tail), "trivial")
        return await self.segmenter.segment(tail, complete)

    def store_exchange(self, key: ConversationKey, request_id: str, user_text: str,
                       assistant_text: str, generation: int | None = None) -> bool:
        text = exchange_text(user_text, assistant_text)
        vector = self.embed([text])[0]
        with self._writer_lock(key):
            if not self.store.add_exchange(key, request_id, user_text, assistant_text,
                                           _blob(vector), generation):
                return False
            self._add_pending_unit(key, self.store.exchange_count(key) - 1, text, vector,
                                   generation)
            return True

    def _add_pending_unit(self, key: ConversationKey, position: int, text: str,
                          vector: np.ndarray, generation: int | None) -> None:
        """The new exchange joins the cached index as a unit of its own until the write's
        units replace it (`_write_units` replaces from the open tail on, and the exchange
        lies in the tail). Segmentation by the served model can take seconds under load:
        without this a next turn sent meanwhile would not recall the previous one."""
        with self._lock:
            cached = self._indexes.get(key)
        if cached is None or (generation is not None and cached[1] != generation):
            return  # the next recall loads the index from the store
        index = cached[0]
        unit = MemoryUnit(self.settings.granularity, position, position, text, text)
        index.replace_from(len(index.units), [unit],
                           np.asarray(vector, dtype=np.float32)[None, :])

    def open_tail(self, key: ConversationKey) -> StoredTail:
        """The open segment and every exchange after it, with TextTiling's context rows."""
        last = self.store.last_unit(key, self.settings.granularity)
        if last is None:
            start = 0
        elif self.settings.granularity == "turn":
            start = last.last_exchange + 1  # turns never grow: nothing is open
        else:
            start = last.first_exchange
        context = min(TAIL_CONTEXT, start)
        exchanges = self.store.exchanges(key, since=start - context)
        vectors = self._exchange_vectors(key, exchanges, start - context)
        tail_exchanges = tuple(exchanges[context:])
        open_unit = last if last is not None and last.first_exchange == start else None
        return StoredTail(start=start, texts=[e.text for e in tail_exchanges],
                          embeddings=vectors, context=context,
                          open_exchanges=(open_unit.last_exchange - start + 1
                                          if open_unit else 0),
                          exchanges=tail_exchanges, open_unit=open_unit)

    def _exchange_vectors(self, key: ConversationKey, exchanges: list[Exchange],
                          since: int) -> np.ndarray:
        stored = self.store.exchange_vectors(key, since)[: len(exchanges)]
        missing = [i for i, blob in enumerate(stored) if blob is None]
        filled = self.embed([exchanges[i].text for i in missing]) if missing else []
        vectors = [_vector(blob) if blob is not None else None for blob in stored]
        for i, vector in zip(missing, filled, strict=True):
            vectors[i] = np.asarray(vector, dtype=np.float32)
        return np.stack(vectors) if vectors else np.zeros((0, EMBEDDING_DIM), np.float32)

    def apply_tail(self, key: ConversationKey, tail: StoredTail, segments: list[Segment],
                   generation: int | None = None) -> bool:
        """Store the units of ``segments`` (relative to the tail) in place of the tail's old
        ones and update the cached index. If another writer moved the tail on since it was
        read, it is read again and segmented by TextTiling here; returns False then."""
        with self._writer_lock(key):
            current = tail
            if not self._is_current(key, tail):
                current = self.open_tail(key)
                segments = self.segments_without_model(current)
            self._write_units(key, current, segments, generation)
            return current is tail

    def _is_current(self, key: ConversationKey, tail: StoredTail) -> bool:
        last = self.store.last_unit(key, self.settings.granularity)
        if tail.open_unit is not None:
            unchanged = last is not None and (last.first_exchange, last.last_exchange) == (
                tail.open_unit.first_exchange, tail.open_unit.last_exchange)
        else:
            unchanged = (last.last_exchange + 1 if last else 0) == tail.start
        return unchanged and self.store.exchange_count(key) == tail.end

    def _write_units(self, key: ConversationKey, tail: StoredTail, segments: list[Segment],
                     generation: int | None) -> None:
        if generation is None:
            generation = self.store.generation(key)
        units = []
        for first, last in segments:
            if tail.open_unit is not None and tail.open_unit.vector is not None and (
                    tail.start + first, tail.start + last) == (
                    tail.open_unit.first_exchange, tail.open_unit.last_exchange):
                units.append(tail.open_unit)
                continue
            run = tail.exchanges[first : last + 1]
            units.append(turn_units(run, self.compress)[0] if self.settings.granularity ==
                         "turn" else segment_units(run, [(0, len(run) - 1)], self.compress)[0])
        self._embed_units(units)
        self.store.replace_units(key, self.settings.granularity, units,
                                 from_exchange=tail.start, generation=generation)
        with self._lock:
            cached = self._indexes.get(key)
            if cached is None:
                return
            index, cached_generation = cached
            if cached_generation != generation:  # erased elsewhere: reload on next recall
                del self._indexes[key]
                return
            index.replace_from(index.position_of(tail.start), units,
                               np.stack([_vector(u.vector) for u in units]) if units
                               else np.zeros((0, EMBEDDING_DIM), np.float32))

    def _embed_units(self, units: list[MemoryUnit]) -> None:
        fresh = [i for i, unit in enumerate(units) if unit.vector is None]
        if fresh:
            vectors = self.embed([units[i].key_text for i in fresh])
            for i, vector in zip(fresh, vectors, strict=True):
                units[i] = replace(units[i], vector=_blob(vector))

    def rebuild(self, key: ConversationKey) -> None:
        """Segment the whole conversation again (TextTiling over every exchange): for bulk
        loads and units from before stored vectors; writes never need it."""
        with self._writer_lock(key):
            generation = self.store.generation(key)
            exchanges = self.store.exchanges(key)
            if self.settings.granularity == "turn":
                spans = [(i, i) for i in range(len(exchanges))]
            else:
                spans = segment_by_embeddings(self._exchange_vectors(key, exchanges, 0))
            tail = StoredTail(start=0, texts=[e.text for e in exchanges],
                              embeddings=np.zeros((0, EMBEDDING_DIM), np.float32), context=0,
                              open_exchanges=0, exchanges=tuple(exchanges))
            with self._lock:
                self._indexes.pop(key, None)
            self._write_units(key, tail, spans, generation)

    # --- reads
    def _cache(self, key: ConversationKey, index: UnitIndex, generation: int) -> None:
        with self._lock:
            self._indexes[key] = (index, generation)
            self._indexes.move_to_end(key)
            while len(self._indexes) > CACHED_INDEXES:
                self._indexes.popitem(last=False)

    def _index(self, key: ConversationKey, generation: int) -> UnitIndex:
        with self._lock:
            cached = self._indexes.get(key)
            if cached is not None and cached[1] == generation:
                self._indexes.move_to_end(key)
                return cached[0]
        units = self.store.units(key, self.settings.granularity)
        if any(u.vector is None for u in units):  # units from before schema v2
            self.rebuild(key)
        elif (units[-1].last_exchange + 1 if units else 0) != self.store.exchange_count(key):
            # A crash between storing an exchange and its units: segment the tail once.
            tail = self.open_tail(key)
            self.apply_tail(key, tail, self.segments_without_model(tail))
        else:
            index = UnitIndex.from_vectors(units, [_vector(u.vector) for u in units])
            self._cache(key, index, generation)
            return index
        units = self.store.units(key, self.settings.granularity)
        index = UnitIndex.from_vectors(units, [_vector(u.vector) for u in units])
        self._cache(key, index, generation)
        return index

    def generation(self, key: ConversationKey) -> int:
        return self.store.generation(key)

    def recall(self, key: ConversationKey, query: str) -> list[MemoryUnit]:
        """The conversation's units most relevant to ``query``, in conversation order."""
        return self.recall_with_generation(key, query)[0]

    def recall_with_generation(self, key: ConversationKey,
                               query: str) -> tuple[list[MemoryUnit], int]:
        """`recall`, and the erase generation it read: a write for this request carries it."""
        generation = self.store.generation(key)
        index = self._index(key, generation)
        if not index.units:
            return [], generation
        vector = self.embed([query])[0] if self.settings.method != "bm25" else None
        units, scores = index.score_units(query, self.settings.method, vector)
        chosen = select(units, scores, top_k=self.settings.top_k,
                        token_budget=self.settings.token_budget)
        return [units[i] for i in chosen], generation

    # --- erasure
    def erase(self, tenant: str, user: str, conversation: str | None = None) -> int:
        """Erase one conversation or all of a user's; returns exchanges deleted."""
        locks: Sequence[threading.Lock] = (
            self._stripes if conversation is None
            else [self._writer_lock(ConversationKey(tenant, user, conversation))])
        with contextlib.ExitStack() as held:
            for lock in locks:  # always in stripe order: no deadlock between erases
                held.enter_context(lock)
            deleted = self.store.erase(tenant, user, conversation)
            with self._lock:
                for key in [k for k in self._indexes if k.tenant == tenant and k.user == user
                            and conversation in (None, k.conversation)]:
                    del self._indexes[key]
        return deleted
