"""SeCom segmentation through the served model vs the embedding fallback (issue 21).

Sessions of the generated corpus (`secom_corpus.py`, true topic runs known) are segmented:
1. by SmolLM2 served by vLLM (chat endpoint, temperature 0) with the paper's batch prompt,
   parsed strictly (`parse_batch_segments`); and, on a few sessions, with the incremental
   Yes/No prompt, one call per new exchange;
2. by TextTiling over MiniLM embeddings (what the gateway falls back to).
Reported: how often the model's answer parses, boundary F1 of each segmenter, and of the
combination the gateway runs (the model where it parses, else TextTiling).

    .venv/bin/python benchmarks/secom_segmentation.py [--sessions 20]
    .venv/bin/python benchmarks/secom_segmentation.py --plot-only results/secom_segmentation.json

`--tail-only` (no model server) compares TextTiling over a whole session with TextTiling as
the gateway's writes run it, over the open tail only, one exchange at a time
(`segment_tail`, replayed), on the same 20 sessions and on 40 whole multi-session
conversations (seed 0; the gateway does not know where sessions end). Writes
`results/secom_segmentation_tail.{json,png}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secom_corpus import make_corpus  # noqa: E402

from prompt_pipeline.secom.embeddings import SentenceEncoder  # noqa: E402
from prompt_pipeline.secom.segmentation import (  # noqa: E402
    batch_prompt,
    boundary_f1,
    incremental_prompt,
    parse_batch_segments,
    parse_continues,
    segment_by_embeddings,
    segment_tail,
)
from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"


def chat(url: str, prompt: str, max_tokens: int) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def session_truth(topics: list[str]) -> list[tuple[int, int]]:
    segments, start = [], 0
    for index in range(len(topics)):
        if index == len(topics) - 1 or topics[index + 1] != topics[index]:
            segments.append((start, index))
            start = index + 1
    return segments


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    incremental = [r["f1_incremental"] for r in result["incremental"]]
    bars = {"batch prompt\n(parsed share)": result["batch_prompt_parsed_share"],
            "incremental Yes/No\n(F1, mean)": statistics.mean(incremental) if incremental else 0,
            "TextTiling\n(F1)": result["f1_texttiling"],
            "gateway's choice\n(F1)": result["f1_gateway_combination"]}
    fig, axis = plt.subplots(figsize=(7, 4))
    axis.bar(list(bars), list(bars.values()), color=["gray", "tab:orange", "tab:blue",
                                                     "tab:green"])
    axis.set(ylim=(0, 1), title=f"SeCom segmenters, {result['sessions']} sessions, "
             f"{result['model']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def replay_tail(vectors, max_exchanges: int = 24, context_rows: int = 2,
                settle: int = 2) -> list:
    """The segments the gateway's writes leave: one exchange at a time, only the open tail
    segmented again (as ConversationMemory does with TextTiling)."""
    closed: list = []
    open_first = 0
    for count in range(1, len(vectors) + 1):
        context = min(context_rows, open_first)
        tail = segment_tail(vectors[open_first - context : count], context,
                            max_exchanges=max_exchanges, settle=settle)
        absolute = [(open_first + first, open_first + last) for first, last in tail]
        closed += absolute[:-1]
        open_first = absolute[-1][0]
    return [*closed, (open_first, len(vectors) - 1)]


def tail_only(encoder) -> None:
    rows, sweep = {}, {}
    sets = {"sessions (seed 2, 20 x 1 session)": [
                (conversation.sessions[0], session_truth(conversation.topics))
                for conversation in make_corpus(20, seed=2, sessions=1)],
            "conversations (seed 0, 40 x 4 sessions)": [
                (conversation.exchanges, conversation.true_segments())
                for conversation in make_corpus(40, seed=0)]}
    for name, dialogues in sets.items():
        whole, tail, units_whole, units_tail = [], [], 0, 0
        scores: dict[str, list[float]] = {}
        for exchanges, truth in dialogues:
            vectors = encoder.encode([f"[user]: {u}\n[assistant]: {a}" for u, a in exchanges])
            batch, replayed = segment_by_embeddings(vectors), replay_tail(vectors)
            # The choices behind the defaults (settle 2, context 2): what the others give.
            for settle in (0, 1, 2, 3):
                for context_rows in (2, 4, 8):
                    scores.setdefault(f"settle {settle}, context {context_rows}", []).append(
                        boundary_f1(replay_tail(vectors, context_rows=context_rows,
                                                settle=settle), truth))
            whole.append(boundary_f1(batch, truth))
            tail.append(boundary_f1(replayed, truth))
            units_whole += len(batch)
            units_tail += len(replayed)
        rows[name] = {"dialogues": len(dialogues),
                      "f1_texttiling_whole": round(statistics.mean(whole), 3),
                      "f1_texttiling_open_tail": round(statistics.mean(tail), 3),
                      "segments_whole": units_whole, "segments_open_tail": units_tail}
        sweep[name] = {label: round(statistics.mean(f1), 3) for label, f1 in scores.items()}
        print(name, rows[name], sweep[name], flush=True)
    result = {"benchmark": "secom_segmentation_tail", "date": time.strftime("%Y-%m-%d"),
              "window": 2, "settle": 2, "context_rows": 2, "max_exchanges": 24, "sets": rows,
              "f1_open_tail_by_setting": sweep}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secom_segmentation_tail.json").write_text(json.dumps(result, indent=1))
    plot_tail(result, RESULTS / "secom_segmentation_tail.png")


def plot_tail(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["sets"])
    fig, axis = plt.subplots(figsize=(7, 4))
    for offset, (field, label) in enumerate((("f1_texttiling_whole", "whole dialogue"),
                                             ("f1_texttiling_open_tail",
                                              "open tail, per write"))):
        axis.bar([i + 0.38 * offset for i in range(len(names))],
                 [result["sets"][n][field] for n in names], width=0.38, label=label)
    axis.set_xticks([i + 0.19 for i in range(len(names))], names, fontsize=8)
    axis.set(ylim=(0, 1), ylabel="boundary F1",
             title=f"TextTiling: whole dialogue vs the gateway's open tail ({result['date']})")
    axis.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1] == "--tail-only":
        tail_only(SentenceEncoder(threads=1))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-only":
        result = json.loads(Path(sys.argv[2]).read_text())
        plot(result, Path(sys.argv[2]).with_suffix(".png"))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--incremental-sessions", type=int, default=3)
    args = parser.parse_args()
    corpus = make_corpus(args.sessions, seed=2, sessions=1)
    encoder = SentenceEncoder(threads=1)
    settings = ServerSettings(workers=1, kv_cache_space_gib=1, max_model_len=8192)
    rows = []
    with one_worker(settings) as url:
        for number, conversation in enumerate(corpus):
            texts = [f"[user]: {u}\n[assistant]: {a}" for u, a in conversation.sessions[0]]
            truth = session_truth(conversation.topics)
            reply = chat(url, batch_prompt(texts), 400)
            parsed = parse_batch_segments(reply, len(texts))
            tiled = segment_by_embeddings(encoder.encode(texts))
            row = {"session": number, "exchanges": len(texts), "true_segments": len(truth),
                   "model_reply": reply[:600], "model_parsed": parsed is not None,
                   "f1_model": boundary_f1(parsed, truth) if parsed else None,
                   "f1_texttiling": boundary_f1(tiled, truth),
                   "f1_gateway": boundary_f1(parsed or tiled, truth)}
            if number < args.incremental_sessions:
                answers, segments, start = [], [], 0
                for index in range(1, len(texts)):
                    verdict = parse_continues(chat(
                        url, incremental_prompt(texts[start:index], texts[index]), 3))
                    answers.append(verdict)
                    if verdict is False:
                        segments.append((start, index - 1))
                        start = index
                segments.append((start, len(texts) - 1))
                row["incremental_parsed_share"] = sum(a is not None for a in answers) / len(
                    answers)
                row["f1_incremental"] = boundary_f1(segments, truth)
            rows.append(row)
            print(f"[segmentation] session {number + 1}/{len(corpus)}: parsed "
                  f"{row['model_parsed']}, F1 TextTiling {row['f1_texttiling']:.2f}",
                  file=sys.stderr, flush=True)
    parsed_rows = [r for r in rows if r["model_parsed"]]
    result = {
        "benchmark": "secom_segmentation", "date": time.strftime("%Y-%m-%d"), "model": MODEL,
        "sessions": len(rows),
        "batch_prompt_parsed_share": len(parsed_rows) / len(rows),
        "f1_model_where_parsed": (statistics.mean(r["f1_model"] for r in parsed_rows)
                                  if parsed_rows else None),
        "f1_texttiling": statistics.mean(r["f1_texttiling"] for r in rows),
        "f1_gateway_combination": statistics.mean(r["f1_gateway"] for r in rows),
        "incremental": [{k: r[k] for k in ("session", "incremental_parsed_share",
                                           "f1_incremental")} for r in rows
                        if "f1_incremental" in r],
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secom_segmentation.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "secom_segmentation.png")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
