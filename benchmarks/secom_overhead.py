"""SeCom's cost on the request path: recall (query embedding, BM25 + MiniLM scores, fusion,
selection) plus injection into the system message, with 100 / 1,000 / 10,000 stored units.

The index of a conversation is built after a write (off the request path) and cached; its
build time is reported apart. Queries are the corpus questions, cycled; 300 timed calls per
size after 20 warm-up calls; one torch thread (the gateway's setting). Target (issue 21):
< 15 ms p50 at 10,000 units on the 2-core CPU. Run it alone on the machine:

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

from secom_corpus import make_corpus  # noqa: E402

from prompt_pipeline.secom.embeddings import SentenceEncoder  # noqa: E402
from prompt_pipeline.secom.memory import ConversationMemory  # noqa: E402
from prompt_pipeline.secom.retrieval import render_context  # noqa: E402
from prompt_pipeline.secom.store import ConversationKey, MemoryUnit, SQLiteMemoryStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (100, 1_000, 10_000)
TIMED, WARMUP = 300, 20


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    fig, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        axis.plot(sizes, [result["sizes"][n][key] for n in sizes], "o-", label=label)
    axis.axhline(15, color="gray", ls=":", label="target p50 < 15 ms")
    axis.set(xlabel="stored units", ylabel="recall + injection (ms)",
             title=f"SeCom request-path overhead, 2-core CPU ({result['date']})")
    axis.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-only":
        result = json.loads(Path(sys.argv[2]).read_text())
        plot(result, Path(sys.argv[2]).with_suffix(".png"))
        return
    encoder = SentenceEncoder(threads=1)
    corpus = make_corpus(60, seed=1)
    exchanges = [f"[user]: {u}\n[assistant]: {a}" for c in corpus for u, a in c.exchanges]
    questions = [q["question"] for c in corpus for q in c.questions]
    result: dict = {"benchmark": "secom_overhead", "date": time.strftime("%Y-%m-%d"),
                    "load_before": os.getloadavg(), "sizes": {}}
    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteMemoryStore(Path(folder) / "memory.sqlite3")
        memory = ConversationMemory(store, encoder.encode)
        for size in SIZES:
            key = ConversationKey.for_request("sk-bench", "user", f"conversation-{size}")
            units = [MemoryUnit("segment", 3 * i, 3 * i + 2,
                                "\n".join(exchanges[(3 * i + j) % len(exchanges)]
                                          for j in range(3)), "")
                     for i in range(size)]
            units = [MemoryUnit(u.kind, u.first_exchange, u.last_exchange, u.text, u.text)
                     for u in units]
            store.replace_units(key, "segment", units)
            started = time.perf_counter()
            memory.recall(key, questions[0])  # builds and caches the index
            build_s = time.perf_counter() - started
            timings = []
            for number in range(WARMUP + TIMED):
                query = questions[number % len(questions)]
                started = time.perf_counter()
                chosen = memory.recall(key, query)
                render_context(chosen)
                if number >= WARMUP:
                    timings.append(1000 * (time.perf_counter() - started))
            result["sizes"][str(size)] = {
                "index_build_s": round(build_s, 2), "p50_ms": round(statistics.median(timings), 2),
                "p99_ms": round(percentile(timings, 0.99), 2), "calls": len(timings)}
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
