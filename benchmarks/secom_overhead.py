"""SeCom's cost on the request path: recall (query embedding, BM25 + MiniLM scores, fusion,
selection) plus injection into the system message, with 100 / 1,000 / 10,000 stored units.

Units and their key embeddings are stored with the conversation (schema v2): a write embeds
the new exchange and the changed units only and refreshes the cached index, off the request
path; a fresh process loads the index from the stored vectors. Reported apart: that load,
and the after-response write cost (median of 5 writes, TextTiling: the served model's
segmentation call, where it runs, comes on top) at each size. Since the open-tail writes, a
write segments only the conversation's open segment and updates BM25 and the embedding
matrix in place; `results/secom_overhead_before.json` is the same script run on the
whole-conversation rebuild (commit a1ded14), drawn beside it. Queries are the corpus
questions, cycled; 300 timed calls per size after 20 warm-up calls; one torch thread (the
gateway's setting). Target (issue 21): < 15 ms p50 at 10,000 units on the 2-core CPU. Run
it alone on the machine:

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/secom_overhead.py
    .venv/bin/python benchmarks/secom_overhead.py --plot-only benchmarks/results/secom_overhead.json
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

import numpy as np  # noqa: E402
from secom_corpus import make_corpus  # noqa: E402

from prompt_pipeline.secom.embeddings import SentenceEncoder  # noqa: E402
from prompt_pipeline.secom.memory import ConversationMemory, exchange_text  # noqa: E402
from prompt_pipeline.secom.retrieval import render_context  # noqa: E402
from prompt_pipeline.secom.store import ConversationKey, SQLiteMemoryStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (100, 1_000, 10_000)
TIMED, WARMUP = 300, 20
WRITES = 5
EXCHANGES_PER_UNIT = 4.85


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    # The units TextTiling actually made (runs before that count was stored: the size asked).
    xs = [result["sizes"][n].get("units", int(n)) for n in sizes]
    fig, (axis, writes) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        axis.plot(xs, [result["sizes"][n][key] for n in sizes], "o-", label=label)
    axis.axhline(15, color="gray", ls=":", label="target p50 < 15 ms")
    axis.set_xscale("log")
    axis.set(xlabel="stored units", ylabel="recall + injection (ms)",
             title=f"SeCom request-path overhead, 2-core CPU ({result['date']})")
    axis.legend()
    exchanges = [result["sizes"][n]["exchanges"] for n in sizes]
    writes.plot(exchanges, [result["sizes"][n]["write_median_s"] for n in sizes], "o-",
                label="open-tail write (median of 5)")
    before_path = png.with_name("secom_overhead_before.json")
    if before_path.exists():
        before = json.loads(before_path.read_text())
        writes.plot([before["sizes"][n]["exchanges"] for n in before["sizes"]],
                    [before["sizes"][n]["write_median_s"] for n in before["sizes"]], "s--",
                    color="gray", label=f"whole-conversation rebuild ({before['date']})")
    writes.set(xscale="log", yscale="log", xlabel="stored exchanges",
               ylabel="one memory write, after the answer (s)",
               title="write cost vs conversation length")
    writes.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


class CachedEmbed:
    """The encoder with a text cache: the corpus repeats, so filling 30,000 exchanges and
    their units embeds each distinct text once (setup only; nothing timed uses it)."""

    def __init__(self, encode) -> None:
        self.encode = encode
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            self.cache.update(zip(missing, self.encode(missing), strict=True))
        return np.stack([self.cache[t] for t in texts])


def fill(store: SQLiteMemoryStore, key: ConversationKey, pairs: list[tuple[str, str]],
         embed: CachedEmbed) -> None:
    """Bulk-load exchanges with their vectors in one transaction (setup: 30,000 single
    writes would each fsync), then build the units as a write would."""
    vectors = embed([exchange_text(u, a) for u, a in pairs])
    with store._transaction() as db:  # noqa: SLF001 - a benchmark's bulk load
        db.executemany("INSERT INTO exchanges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (key.tenant, key.user, key.conversation, i, f"bulk-{i}", u, a, 0.0,
             vectors[i].astype(np.float32).tobytes()) for i, (u, a) in enumerate(pairs)])
    ConversationMemory(store, embed).rebuild(key)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-only":
        result = json.loads(Path(sys.argv[2]).read_text())
        plot(result, Path(sys.argv[2]).with_suffix(".png"))
        return
    encoder = SentenceEncoder(threads=1)
    cached = CachedEmbed(encoder.encode)
    corpus = make_corpus(60, seed=1)
    pairs = [pair for c in corpus for pair in c.exchanges]
    questions = [q["question"] for c in corpus for q in c.questions]
    result: dict = {"benchmark": "secom_overhead", "date": time.strftime("%Y-%m-%d"),
                    "load_before": os.getloadavg(), "sizes": {}}
    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteMemoryStore(Path(folder) / "memory.sqlite3")
        for size in SIZES:
            key = ConversationKey.for_request("sk-bench", "user", f"conversation-{size}")
            # ~4.85 exchanges per TextTiling segment on this corpus (a run with 3.3 gave 6,816
            # units for 10,000): 4.85 x size exchanges
            count = int(EXCHANGES_PER_UNIT * size)
            fill(store, key, [pairs[i % len(pairs)] for i in range(count)], cached)
            units = len(store.units(key, "segment"))
            memory = ConversationMemory(store, encoder.encode)  # a fresh gateway process
            started = time.perf_counter()
            memory.recall(key, questions[0])  # loads the stored vectors: no embedding
            load_s = time.perf_counter() - started
            timings = []
            for number in range(WARMUP + TIMED):
                query = questions[number % len(questions)]
                started = time.perf_counter()
                chosen = memory.recall(key, query)
                render_context(chosen)
                if number >= WARMUP:
                    timings.append(1000 * (time.perf_counter() - started))
            writes = []  # after-response cost of one more exchange (off the request path)
            for number in range(WRITES):
                user, assistant = pairs[(number * 7) % len(pairs)]
                started = time.perf_counter()
                memory.remember(key, f"write-{number}", user, assistant)
                writes.append(time.perf_counter() - started)
            result["sizes"][str(size)] = {
                "units": units, "exchanges": count,
                "index_load_s": round(load_s, 3),
                "p50_ms": round(statistics.median(timings), 2),
                "p99_ms": round(percentile(timings, 0.99), 2), "calls": len(timings),
                "write_median_s": round(statistics.median(writes), 3),
                "write_max_s": round(max(writes), 3), "writes": len(writes)}
            print(size, result["sizes"][str(size)], flush=True)
        store.close()
    result["load_after"] = os.getloadavg()
    result["target"] = "p50 < 15 ms at 10,000 units"
    if "10000" in result["sizes"]:
        result["met"] = result["sizes"]["10000"]["p50_ms"] < 15
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secom_overhead.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "secom_overhead.png")

if __name__ == "__main__":
    main()
