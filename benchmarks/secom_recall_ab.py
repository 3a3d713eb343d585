"""Did the open-tail index slow recall? An interleaved A/B in one process at 10,000 units,
so the shared machine's load hits both sides alike (benchmarks/secom_NOTES.md).

A: the retrieval work as before the open-tail writes (a bm25s index over the key texts,
   cosine by one matmul, rank fusion, selection);
B: `ConversationMemory.recall` now (the erase-generation read, the cached index with our own
   BM25, the same fusion and selection; the query embedding is a stub on both sides: MiniLM
   is unchanged and is most of the request-path cost, `secom_overhead.py`).
Units: 10,000 five-exchange texts from the corpus, random unit vectors. 300 alternating calls
after 20 warm-up calls each.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/secom_recall_ab.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bm25s  # noqa: E402
import numpy as np  # noqa: E402
from secom_corpus import make_corpus  # noqa: E402

from prompt_pipeline.secom.memory import ConversationMemory  # noqa: E402
from prompt_pipeline.secom.retrieval import rrf, select, tokenize  # noqa: E402
from prompt_pipeline.secom.store import ConversationKey, MemoryUnit, SQLiteMemoryStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNITS, CALLS, WARMUP = 10_000, 300, 20


def main() -> None:
    corpus = make_corpus(60, seed=1)
    pairs = [pair for conversation in corpus for pair in conversation.exchanges]
    questions = [q["question"] for conversation in corpus for q in conversation.questions]
    rng = np.random.default_rng(0)
    units = []
    for number in range(UNITS):
        start = (number * 5) % len(pairs)
        text = "\n".join(f"[user]: {u}\n[assistant]: {a}" for u, a in pairs[start:start + 5])
        vector = rng.standard_normal(384).astype(np.float32)
        units.append(MemoryUnit("segment", number * 5, number * 5 + 4, text, text,
                                (vector / np.linalg.norm(vector)).tobytes()))
    query_vector = rng.standard_normal(384).astype(np.float32)
    query_vector /= np.linalg.norm(query_vector)
    store = SQLiteMemoryStore(Path(tempfile.mkdtemp(prefix="secom-ab-")) / "m.sqlite3")
    key = ConversationKey.for_request("sk", "user", "ab")
    store.replace_units(key, "segment", units)
    with store._transaction() as db:  # noqa: SLF001 - bulk load: the exchanges the units cover
        db.executemany("INSERT INTO exchanges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (key.tenant, key.user, key.conversation, i, f"bulk-{i}", "u", "a", 0.0, None)
            for i in range(UNITS * 5)])
    memory = ConversationMemory(store, lambda texts: np.stack([query_vector] * len(texts)))
    reference = bm25s.BM25()
    reference.index([tokenize(u.key_text) or ["_"] for u in units], show_progress=False)
    matrix = np.stack([np.frombuffer(u.vector, np.float32) for u in units])

    def before(query: str) -> list[int]:
        words = [w for w in tokenize(query) if w in reference.vocab_dict]
        lexical = (np.asarray(reference.get_scores(words), dtype=np.float32) if words
                   else np.zeros(len(units), np.float32))
        return select(units, rrf(lexical, matrix @ query_vector), top_k=3, token_budget=600)

    def now(query: str) -> object:
        return memory.recall(key, query)

    timings: dict[str, list[float]] = {"before": [], "now": []}
    for number in range(WARMUP + CALLS):
        query = questions[number % len(questions)]
        for name, call in (("before", before), ("now", now)):
            started = time.perf_counter()
            call(query)
            if number >= WARMUP:
                timings[name].append(1000 * (time.perf_counter() - started))
    result = {"benchmark": "secom_recall_ab", "date": time.strftime("%Y-%m-%d"),
              "units": UNITS, "calls": CALLS, "load": os.getloadavg(),
              "p50_ms": {k: round(statistics.median(v), 2) for k, v in timings.items()},
              "p90_ms": {k: round(sorted(v)[int(0.9 * len(v))], 2) for k, v in timings.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secom_recall_ab.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
