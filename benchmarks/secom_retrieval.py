"""SeCom retrieval quality on a generated long-conversation QA corpus (issue 21).

Units at three granularities (turn = one exchange, session, segment) and two segmenters
(the corpus' true topic runs, and the embedding TextTiling segmenter the gateway falls back
to), retrieved by BM25, MiniLM embeddings, or both fused (RRF). A question is answered from
memory when a retrieved unit contains its evidence exchange; questions are reported by the
corpus' fact style too (direct, or stated in context: `secom_corpus.py`). Reported:
recall@1 and @3, and recall under a budget of 150 words of retrieved text (larger units
spend it faster); the TextTiling segmenter's boundary F1 against the true runs.
With `--compressor DIR` every granularity is also indexed by compressed keys ("+comp"):
the shared token classifier trained for this (`secom_train_keys.py`, labels in
`prompt_pipeline/secom/key_labels.py`) in target-rate mode (`--rate`, digits forced); the
units' text, what a generator would get, is unchanged.

    .venv/bin/python benchmarks/secom_retrieval.py [--conversations 40]
        [--compressor prompt_pipeline/secom/artifacts/keys-compact --rate 0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataclasses import replace  # noqa: E402

from secom_corpus import make_corpus  # noqa: E402

from prompt_pipeline.secom.embeddings import SentenceEncoder  # noqa: E402
from prompt_pipeline.secom.retrieval import UnitIndex, select  # noqa: E402
from prompt_pipeline.secom.segmentation import boundary_f1, segment_by_embeddings  # noqa: E402
from prompt_pipeline.secom.store import Exchange  # noqa: E402
from prompt_pipeline.secom.units import segment_units, session_units, turn_units  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("bm25", "embedding", "fused")
BUDGET_WORDS = 150


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compressor", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=0.5)
    args = parser.parse_args()
    started = time.monotonic()
    encoder = SentenceEncoder(threads=1)
    embed = encoder.encode
    compress = None
    kept_shares: list[float] = []
    if args.compressor is not None:
        from prompt_pipeline.token_classifier import TokenClassifier

        classifier = TokenClassifier.load(args.compressor)

        def compress(text: str) -> str:
            result = classifier.compress(text, rate=args.rate, force_digits=True)
            kept_shares.append(float(result.keep.mean()) if len(result.keep) else 1.0)
            return result.text
    corpus = make_corpus(args.conversations, seed=args.seed)
    hits: dict[str, list[float]] = {}
    f1s, unit_words = [], {}
    for number, conversation in enumerate(corpus):
        exchanges = [Exchange(i, f"r{i}", user, assistant, 0.0)
                     for i, (user, assistant) in enumerate(conversation.exchanges)]
        sessions, at = [], 0
        for session in conversation.sessions:
            sessions.append(exchanges[at : at + len(session)])
            at += len(session)
        exchange_vectors = embed([exchange.text for exchange in exchanges])
        tiled = []
        for session in sessions:  # segments never cross a session boundary
            first = session[0].position
            tiled += [(first + a, first + b) for a, b in
                      segment_by_embeddings(exchange_vectors[first : first + len(session)])]
        f1s.append(boundary_f1(tiled, conversation.true_segments()))
        unit_sets = {
            "turn": turn_units(exchanges),
            "session": session_units(sessions),
            "segment (true runs)": segment_units(exchanges, conversation.true_segments()),
            "segment (TextTiling)": segment_units(exchanges, tiled),
        }
        if compress is not None:
            unit_sets.update({f"{name} +comp": [replace(u, key_text=compress(u.text))
                                                for u in units]
                              for name, units in list(unit_sets.items())})
        questions = [q["question"] for q in conversation.questions]
        query_vectors = embed(questions)
        for granularity, units in unit_sets.items():
            index = UnitIndex.build(units, embed)
            unit_words.setdefault(granularity, []).append(
                statistics.mean(len(u.text.split()) for u in units))
            for question, vector in zip(conversation.questions, query_vectors, strict=True):
                for method in METHODS:
                    scores = index.scores(question["question"], method, vector)
                    order = np.argsort(-scores, kind="stable")
                    covers = [units[i].first_exchange <= question["evidence"]
                              <= units[i].last_exchange for i in order]
                    budget = select(units, scores, token_budget=BUDGET_WORDS)
                    in_budget = any(units[i].first_exchange <= question["evidence"]
                                    <= units[i].last_exchange for i in budget)
                    for metric, value in (("recall@1", covers[0]),
                                          ("recall@3", any(covers[:3])),
                                          (f"recall@{BUDGET_WORDS}w", in_budget)):
                        for scope in ("all", question["style"]):
                            name = f"{granularity}|{method}|{metric}|{scope}"
                            hits.setdefault(name, []).append(float(value))
        print(f"[secom] conversation {number + 1}/{len(corpus)}", file=sys.stderr, flush=True)
    table = {key: round(statistics.mean(values), 4) for key, values in sorted(hits.items())}
    result = {
        "benchmark": "secom_retrieval", "date": time.strftime("%Y-%m-%d"),
        "corpus": {"conversations": len(corpus),
                   "exchanges": sum(len(c.exchanges) for c in corpus),
                   "questions": sum(len(c.questions) for c in corpus), "seed": args.seed},
        "compression": ("none" if compress is None else {
            "artifact": str(args.compressor), "mode": "target rate", "rate": args.rate,
            "force_digits": True, "kept_word_share": round(statistics.mean(kept_shares), 3),
            "labels": "rule teacher, prompt_pipeline/secom/key_labels.py"}),
        "budget_words": BUDGET_WORDS,
        "mean_unit_words": {k: round(statistics.mean(v), 1) for k, v in unit_words.items()},
        "texttiling_boundary_f1": round(statistics.mean(f1s), 4),
        "recall": table,
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secom_retrieval.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "secom_retrieval.png")
    for scope in ("all", "direct", "in_context"):
        print(f"-- {scope}: recall@1 / @3 / @{BUDGET_WORDS} words")
        for granularity in unit_sets:
            row = "  ".join(f"{m}: " + "/".join(
                f"{table[f'{granularity}|{m}|{k}|{scope}']:.2f}" for k in
                ("recall@1", "recall@3", f"recall@{BUDGET_WORDS}w")) for m in METHODS)
            print(f"{granularity:22s} {row}")
    print(f"TextTiling boundary F1 {result['texttiling_boundary_f1']}; units' mean words "
          f"{result['mean_unit_words']}")


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    granularities = list(result["mean_unit_words"])
    metrics = ("recall@1", "recall@3", f"recall@{result['budget_words']}w")
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(14, 2.2 * len(granularities)), 4),
                             sharey=True)
    for axis, metric in zip(axes, metrics, strict=True):
        for offset, method in enumerate(METHODS):
            xs = [i + (offset - 1) * 0.27 for i in range(len(granularities))]
            axis.bar(xs, [result["recall"][f"{g}|{method}|{metric}|all"] for g in granularities],
                     0.27, label=method)
        axis.set_xticks(range(len(granularities)), granularities, rotation=15, fontsize=8)
        axis.set_title(metric)
    axes[0].set_ylabel("share of questions whose evidence is retrieved")
    axes[0].legend(fontsize=8)
    compression = result["compression"]
    label = ("no compression" if compression == "none"
             else f"+comp: token classifier, target rate {compression['rate']}")
    fig.suptitle(f"SeCom units on {result['corpus']['questions']} generated questions "
                 f"({label}; {result['date']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
