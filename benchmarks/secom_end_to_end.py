"""SeCom end to end (issue 21): answer accuracy of the served SmolLM2-135M through the real
gateway, with conversation memory on vs off, on the same questions.

Memory is filled from generated long conversations (`secom_corpus.py`: facts stated in
earlier sessions, questions with short known answers) by the same `ConversationMemory` the
gateway runs, in the SQLite file the gateway then opens: feeding each of ~50 exchanges per
conversation through the model would cost an hour of this CPU and change nothing the
questions test (the write path itself is covered by tests/integration/test_secom.py).
Each question then goes through a real gateway (`pipeline: {stages: [secom]}`) in front of
one real vLLM worker, temperature 0, twice: with the conversation id and
`x-tessera-memory: recall` (recall, store nothing, so questions do not feed each other), and
with `x-tessera-memory: off`. Scored: exact match (the normalised answer equals the
expected word(s)), contains (the expected word appears in the answer), and, for memory on,
whether the expected answer was in the prompt vLLM ran (read back with prompt_logprobs):
retrieval's share, apart from the model's. Latency per request, median of all questions.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/secom_end_to_end.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secom_corpus import make_corpus  # noqa: E402

from prompt_pipeline.secom.embeddings import SentenceEncoder  # noqa: E402
from prompt_pipeline.secom.memory import ConversationMemory  # noqa: E402
from prompt_pipeline.secom.store import ConversationKey, SQLiteMemoryStore  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import free_port, one_worker, wait_for_health  # noqa: E402
from server.model_prep import SERVED_MODEL_NAME  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# A one-line example: asked for "one or two words" alone, SmolLM2-135M answered in sentences
# (exact match 0 of 73 on 2026-12-01, memory on and off; contains 0.29 vs 0.03).
SYSTEM = ("Reply with the answer only: one word, no sentence.\n"
          "Example: Q: What colour is my car? A: Red")
CONVERSATION = "bench"


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def fill_memory(db: Path, corpus: list, embed) -> None:
    store = SQLiteMemoryStore(db)
    memory = ConversationMemory(store, embed)
    for number, conversation in enumerate(corpus):
        key = ConversationKey.for_request(None, f"user{number}", CONVERSATION)
        for position, (user, assistant) in enumerate(conversation.exchanges):
            memory.remember(key, f"c{number}-e{position}", user, assistant)
        print(f"[secom-e2e] memory of conversation {number + 1}/{len(corpus)}",
              file=sys.stderr, flush=True)
    store.close()


def ask(client: httpx.Client, url: str, question: str, user: str, memory: bool,
        max_tokens: int) -> dict:
    headers = ({"x-tessera-conversation": CONVERSATION, "x-tessera-memory": "recall"}
               if memory else {"x-tessera-memory": "off"})
    body = {"model": SERVED_MODEL_NAME, "temperature": 0, "max_tokens": max_tokens,
            "user": user, "prompt_logprobs": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question}]}
    started = time.perf_counter()
    response = client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    payload = response.json()
    prompt = "".join(next(iter(entry.values()))["decoded_token"]
                     for entry in payload["prompt_logprobs"] if entry)
    return {"answer": payload["choices"][0]["message"]["content"], "prompt": prompt,
            "prompt_tokens": payload["usage"]["prompt_tokens"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    started = time.monotonic()
    corpus = make_corpus(args.conversations, seed=args.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="secom-e2e-"))
    db = run_dir / "memory.sqlite3"
    fill_memory(db, corpus, SentenceEncoder(threads=1).encode)
    config = run_dir / "tessera.yaml"
    config.write_text(json.dumps({"pipeline": {"stages": ["secom"],
                                               "secom": {"db_path": str(db)}}}))
    settings = ServerSettings(data_dir=Path(os.environ.get("TESSERA_DATA_DIR", "data")),
                              workers=1, kv_cache_space_gib=1, max_model_len=4096)
    rows = []
    with one_worker(settings) as worker_url:
        port = free_port()
        log = open(run_dir / "gateway.log", "ab")  # noqa: SIM115 (closed below)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "gateway", "--port", str(port),
             "--worker-url", worker_url, "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, gateway, timeout_s=180)
            with httpx.Client(timeout=300) as client:
                for number, conversation in enumerate(corpus):
                    for question in conversation.questions:
                        row = {"conversation": number, **{k: question[k] for k in
                               ("question", "answer", "style", "session")}}
                        for memory in (True, False):
                            got = ask(client, url, question["question"], f"user{number}",
                                      memory, args.max_tokens)
                            expected = normalise(question["answer"])
                            said = normalise(got["answer"])
                            row["on" if memory else "off"] = {
                                "answer": got["answer"], "exact": said == expected,
                                "contains": expected in said.split(),
                                "answer_in_prompt": question["answer"] in got["prompt"],
                                "prompt_tokens": got["prompt_tokens"],
                                "seconds": round(got["seconds"], 4)}
                        rows.append(row)
                    print(f"[secom-e2e] questions of conversation {number + 1}/{len(corpus)}",
                          file=sys.stderr, flush=True)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            log.close()

    def share(mode: str, field: str, rows: list = rows) -> float:
        return round(statistics.mean(float(r[mode][field]) for r in rows), 4)

    summary = {}
    for mode in ("on", "off"):
        summary[mode] = {
            "exact_match": share(mode, "exact"), "contains": share(mode, "contains"),
            "answer_in_prompt": share(mode, "answer_in_prompt"),
            "prompt_tokens_median": statistics.median(r[mode]["prompt_tokens"] for r in rows),
            "seconds_median": round(statistics.median(r[mode]["seconds"] for r in rows), 4),
            "by_style": {style: {"exact_match": share(mode, "exact", subset),
                                 "contains": share(mode, "contains", subset),
                                 "answer_in_prompt": share(mode, "answer_in_prompt", subset)}
                         for style in ("direct", "in_context")
                         for subset in [[r for r in rows if r["style"] == style]]}}
    result = {
        "benchmark": "secom_end_to_end", "date": time.strftime("%Y-%m-%d"),
        "model": SERVED_MODEL_NAME, "dtype": settings.dtype,
        "corpus": {"conversations": len(corpus), "seed": args.seed, "questions": len(rows),
                   "exchanges": sum(len(c.exchanges) for c in corpus)},
        "memory": "segment units, fused BM25 + MiniLM, top 3, 600-word budget (defaults)",
        "max_tokens": args.max_tokens, "system": SYSTEM, "summary": summary, "rows": rows,
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secom_end_to_end.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "secom_end_to_end.png")
    print(json.dumps(summary, indent=1))


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("exact_match", "contains", "answer_in_prompt")
    fig, axis = plt.subplots(figsize=(7, 4))
    for offset, mode in enumerate(("off", "on")):
        xs = [i + (offset - 0.5) * 0.38 for i in range(len(metrics))]
        values = [result["summary"][mode][m] for m in metrics]
        bars = axis.bar(xs, values, 0.38, label=f"memory {mode}")
        axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.set_xticks(range(len(metrics)), ["exact match", "answer contains it",
                                          "answer in the prompt"])
    axis.set_ylim(0, 1.05)
    axis.set_ylabel(f"share of {result['corpus']['questions']} questions")
    axis.legend()
    axis.set_title(f"SmolLM2-135M through the gateway, SeCom memory on vs off "
                   f"({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
