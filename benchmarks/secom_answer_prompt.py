"""Where and how the gateway injects recalled memory, chosen on a tuning corpus (issue 21).

The end-to-end benchmark (`secom_end_to_end.py`, seed 1) measures exact match with the
client's instruction "Reply with the answer only" in its system message; the gateway
appended the memory block after that instruction, so ~400 tokens of old conversation stood
between the instruction and the question. This compares injection variants on a separate
tuning corpus (seed 5: other conversations, facts and questions; the reported benchmark's
questions are not used to choose), the same client system message, one vLLM worker
(SmolLM2-135M, temperature 0, 12 tokens):
- `after`: the block appended to the client's system message (as shipped before);
- `before`: the block first, the client's instructions last, next to the question;
- `before_evidence`: as `before`, headed the way SeCom's answer prompt frames it (related
  evidence, use it where it helps).
Units come from the same `ConversationMemory` recall the gateway runs (segments, fused, top
3, 600 words). Scored as the end-to-end benchmark scores (exact match, contains).

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/secom_answer_prompt.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secom_corpus import make_corpus  # noqa: E402
from secom_end_to_end import CONVERSATION, SYSTEM, fill_memory, normalise  # noqa: E402

from prompt_pipeline.secom.embeddings import SentenceEncoder  # noqa: E402
from prompt_pipeline.secom.memory import ConversationMemory  # noqa: E402
from prompt_pipeline.secom.retrieval import render_context  # noqa: E402
from prompt_pipeline.secom.store import ConversationKey, SQLiteMemoryStore  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker  # noqa: E402
from server.model_prep import SERVED_MODEL_NAME  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TUNING_SEED = 5
OLD_HEADER = "Relevant parts of your earlier conversation with this user:"
EVIDENCE_HEADER = ("Related evidence from your earlier conversations with this user; use it "
                   "where it helps with the user's message:")


def system_message(variant: str, units: list) -> str:
    if variant == "after":
        return f"{SYSTEM}\n\n{render_context(units, OLD_HEADER)}"
    header = OLD_HEADER if variant == "before" else EVIDENCE_HEADER
    return f"{render_context(units, header)}\n\n{SYSTEM}"


def main() -> None:
    started = time.monotonic()
    corpus = make_corpus(10, seed=TUNING_SEED)
    encoder = SentenceEncoder(threads=1)
    db = Path(tempfile.mkdtemp(prefix="secom-answer-")) / "memory.sqlite3"
    fill_memory(db, corpus, encoder.encode)
    memory = ConversationMemory(SQLiteMemoryStore(db), encoder.encode)
    variants = ("after", "before", "before_evidence")
    settings = ServerSettings(data_dir=Path(os.environ.get("TESSERA_DATA_DIR", "data")),
                              workers=1, kv_cache_space_gib=1, max_model_len=4096)
    rows = []
    with one_worker(settings) as url, httpx.Client(timeout=300) as client:
        for number, conversation in enumerate(corpus):
            key = ConversationKey.for_request(None, f"user{number}", CONVERSATION)
            for question in conversation.questions:
                units = memory.recall(key, question["question"])
                row = {"question": question["question"], "answer": question["answer"]}
                for variant in variants:
                    body = {"model": SERVED_MODEL_NAME, "temperature": 0, "max_tokens": 12,
                            "messages": [{"role": "system",
                                          "content": system_message(variant, units)},
                                         {"role": "user", "content": question["question"]}]}
                    reply = client.post(f"{url}/v1/chat/completions", json=body).json()
                    said = normalise(reply["choices"][0]["message"]["content"])
                    expected = normalise(question["answer"])
                    row[variant] = {"answer": reply["choices"][0]["message"]["content"],
                                    "exact": said == expected,
                                    "contains": expected in said.split()}
                rows.append(row)
            print(f"[secom-answer] conversation {number + 1}/{len(corpus)}", file=sys.stderr,
                  flush=True)
    summary = {variant: {field: round(statistics.mean(float(r[variant][field]) for r in rows), 4)
                         for field in ("exact", "contains")} for variant in variants}
    result = {"benchmark": "secom_answer_prompt", "date": time.strftime("%Y-%m-%d"),
              "model": SERVED_MODEL_NAME, "tuning_seed": TUNING_SEED, "questions": len(rows),
              "client_system": SYSTEM, "headers": {"old": OLD_HEADER,
                                                   "evidence": EVIDENCE_HEADER},
              "summary": summary, "rows": rows, "wall_s": round(time.monotonic() - started, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secom_answer_prompt.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
