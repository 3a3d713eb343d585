"""TriangleMix vs dense on SmolLM2-135M served by vLLM (CPU), byte-identical prompts.

1. Layer split by measurement: for each candidate `dense_first_layers`, logit fidelity vs
   dense on long real text (a license text) and on a repeat document (second half repeats
   the first: long-range copying). Reported per position bucket: top-1 agreement of the
   next-token distributions, KL(dense || method) over dense's top-20 tokens (vLLM returns
   at most 20 logprobs; a token missing from the method's top-20 gets the method's 20th
   logprob, so the KL is a lower bound), and the perplexity of the text.
   Chosen: the smallest split (most sparse layers) with top-1 >= 0.95 on the text and
   repeat perplexity within 10% of dense.
2. Task accuracy with the chosen split vs dense: completion-style retrieval (longctx_suite)
   at several lengths, 10 cases a cell, depths 0-100%, temperature 0.
3. Negative control: sinks + window only (no last-q rows, every layer sparse) must fail the
   passkey task, proving the task can detect dropped keys.
Writes benchmarks/results/trianglemix_fidelity.json (after every step) and .png.

    .venv/bin/python benchmarks/trianglemix_fidelity.py [--lengths 2048 4096 7168] [--cases 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from longctx_suite import build_cases  # noqa: E402

from server.config import ServerSettings  # noqa: E402
from server.launcher import (  # noqa: E402
    free_port,
    resolve_model_path,
    start_worker,
    stop_workers,
    wait_until_healthy,
)

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "trianglemix_fidelity.json"
MODEL = "smollm2-135m-instruct"
NUM_LAYERS = 30
TOP_LOGPROBS = 20
BUCKET_TOKENS = 1024
TEXT_DOC = "/usr/share/common-licenses/GPL-3"
REPEAT_DOC = "/usr/share/common-licenses/GFDL-1.3"



def log(message: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def served(settings: ServerSettings, model_path: Path, env: dict[str, str]) -> Iterator[str]:
    worker = start_worker(settings, model_path, 0, port=free_port(), extra_env=env)
    try:
        wait_until_healthy([worker], timeout_s=600)
        yield worker.url
    finally:
        stop_workers([worker])


def trianglemix_env(dense_first_layers: int, **overrides: int) -> dict[str, str]:
    env = {"TESSERA_ATTENTION_METHOD": "trianglemix",
           "TESSERA_ATTENTION_DENSE_FIRST_LAYERS": str(dense_first_layers)}
    env.update({f"TESSERA_ATTENTION_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


# --- logit fidelity
def prompt_logprobs(url: str, prompt: str) -> list[dict[int, float]]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": TOP_LOGPROBS}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=1800)
    response.raise_for_status()
    positions = response.json()["choices"][0]["prompt_logprobs"][1:]  # first token: none
    return [{int(tok): entry["logprob"] for tok, entry in pos.items()} for pos in positions]


def actual_token_ids(url: str, prompt: str) -> list[int]:
    response = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": prompt}, timeout=60)
    response.raise_for_status()
    return response.json()["tokens"][1:]


def compare_logprobs(dense: list[dict[int, float]], method: list[dict[int, float]],
                     targets: list[int]) -> dict:
    kl, agree, nll_dense, nll_method = [], [], [], []
    for d, m, target in zip(dense, method, targets, strict=True):
        floor = min(m.values())
        kl.append(sum(math.exp(lp) * (lp - m.get(tok, floor)) for tok, lp in d.items()))
        agree.append(max(d, key=d.get) == max(m, key=m.get))
        nll_dense.append(-d[target])
        nll_method.append(-m[target])
    buckets = []
    for start in range(0, len(kl), BUCKET_TOKENS):
        end = min(start + BUCKET_TOKENS, len(kl))
        buckets.append({"positions": [start + 1, end],
                        "kl": sum(kl[start:end]) / (end - start),
                        "top1_agreement": sum(agree[start:end]) / (end - start)})
    half = len(targets) // 2
    return {
        "tokens": len(kl),
        "kl_mean": sum(kl) / len(kl),
        "top1_agreement": sum(agree) / len(agree),
        "ppl_dense": math.exp(sum(nll_dense) / len(nll_dense)),
        "ppl_method": math.exp(sum(nll_method) / len(nll_method)),
        "ppl_dense_second_half": math.exp(sum(nll_dense[half:]) / (len(nll_dense) - half)),
        "ppl_method_second_half": math.exp(sum(nll_method[half:]) / (len(nll_method) - half)),
        "buckets": buckets,
    }


def load_documents(url: str, doc_tokens: int) -> dict[str, str]:
    """Ordinary text (truncated) and a repeat document, cut to token budgets by the worker."""
    def cut(text: str, tokens: int) -> str:
        response = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text,
                                                       "add_special_tokens": False}, timeout=60)
        ids = response.json()["tokens"][:tokens]
        return httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": ids},
                          timeout=60).json()["prompt"]

    text = cut(Path(TEXT_DOC).read_text(), doc_tokens)
    half = cut(Path(REPEAT_DOC).read_text(), doc_tokens // 2)
    return {"text": text, "repeat": half + "\n\n" + half}


# --- tasks
def run_tasks(url: str, cases: list) -> list[dict]:
    rows = []
    for number, case in enumerate(cases, 1):
        body = {"model": MODEL, "prompt": case.prompt, "max_tokens": 12, "temperature": 0,
                "seed": 0}
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=1800)
        response.raise_for_status()
        reply = response.json()
        text = reply["choices"][0]["text"]
        rows.append({"task": case.task, "target_tokens": case.target_tokens,
                     "index": case.index, "depth": case.depth,
                     "prompt_tokens": reply["usage"]["prompt_tokens"], "answer": case.answer,
                     "completion": text, "passed": case.passed(text),
                     "seconds": time.perf_counter() - started})
        if number % 10 == 0:
            log(f"  {number}/{len(cases)} cases")
    return rows


def accuracy_table(rows: list[dict]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, list[bool]]] = {}
    for row in rows:
        table.setdefault(row["task"], {}).setdefault(str(row["target_tokens"]), []).append(
            row["passed"])
    return {task: {length: sum(v) / len(v) for length, v in cells.items()}
            for task, cells in table.items()}


def lost_cases(dense_rows: list[dict], method_rows: list[dict]) -> list[dict]:
    """Cases dense gets right that the method gets wrong."""
    return [{k: m[k] for k in ("task", "target_tokens", "index", "depth", "answer",
                               "completion")}
            for d, m in zip(dense_rows, method_rows, strict=True)
            if d["passed"] and not m["passed"]]


def save(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(result, indent=2))


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    splits = result["split_search"]
    names = [str(s["dense_first_layers"]) for s in splits]
    axes[0].plot(names, [s["text"]["top1_agreement"] for s in splits], "o-", label="top-1, text")
    axes[0].plot(names, [s["repeat"]["top1_agreement"] for s in splits], "o-",
                 label="top-1, repeat doc")
    axes[0].plot(names, [s["text"]["kl_mean"] for s in splits], "s--", label="KL, text")
    axes[0].plot(names, [s["repeat"]["kl_mean"] for s in splits], "s--", label="KL, repeat")
    axes[0].set(xlabel="dense_first_layers (of 30)", title="logit fidelity vs dense")
    axes[0].legend()
    chosen = result.get("chosen_split")
    if chosen is not None:
        for split in splits:
            if split["dense_first_layers"] == chosen:
                for key, style in (("text", "o-"), ("repeat", "s-")):
                    buckets = split[key]["buckets"]
                    axes[1].plot([b["positions"][1] for b in buckets],
                                 [b["top1_agreement"] for b in buckets], style, label=key)
        axes[1].set(xlabel="position", ylabel="top-1 agreement", ylim=(0, 1.02),
                    title=f"by position, split {chosen}")
        axes[1].legend()
    accuracy = result.get("accuracy")
    if accuracy:
        labels, dense_values, method_values = [], [], []
        for task, cells in accuracy["dense"].items():
            for length, value in cells.items():
                labels.append(f"{task}\n{length}")
                dense_values.append(value)
                method_values.append(accuracy["trianglemix"].get(task, {}).get(length, 0))
        positions = range(len(labels))
        axes[2].bar([p - 0.2 for p in positions], dense_values, 0.4, label="dense")
        axes[2].bar([p + 0.2 for p in positions], method_values, 0.4, label="TriangleMix")
        axes[2].set_xticks(list(positions), labels, fontsize=7)
        axes[2].set(ylabel="accuracy", ylim=(0, 1.05), title="completion-style retrieval")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "trianglemix_fidelity.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7168])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", default=["passkey", "variable_lookup", "multi_key"])
    parser.add_argument("--splits", type=int, nargs="+", default=[8, 15, 22])
    parser.add_argument("--doc-tokens", type=int, default=6144)
    args = parser.parse_args()

    settings = ServerSettings(workers=1, kv_cache_space_gib=2, max_model_len=8192)
    model_path = resolve_model_path(settings)
    result: dict = {"benchmark": "trianglemix_fidelity", "model": MODEL,
                    "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "pattern": {"sink_tokens": 8, "window_tokens": 512, "last_q_tokens": 128},
                    "args": vars(args)}
    count_url: str
    with served(settings, model_path, {"TESSERA_ATTENTION_METHOD": "dense"}) as url:
        count_url = url
        docs = load_documents(url, args.doc_tokens)
        targets = {name: actual_token_ids(url, doc) for name, doc in docs.items()}
        log("dense: logprobs on the documents")
        dense_logprobs = {name: prompt_logprobs(url, doc) for name, doc in docs.items()}

        def count_tokens(text: str) -> int:
            return len(httpx.post(f"{count_url}/tokenize",
                                  json={"model": MODEL, "prompt": text}).json()["tokens"])

        cases = [case for task in args.tasks for length in args.lengths
                 for case in build_cases(task, length, args.cases, count_tokens)]
        negative_cases = build_cases("passkey", 4096, args.cases, count_tokens)
        log(f"dense: {len(cases)} task cases")
        dense_rows = run_tasks(url, cases)
    result["dense_rows"] = dense_rows
    save(result)

    result["split_search"] = []
    for split in args.splits:
        log(f"split {split}: logprobs")
        with served(settings, model_path, trianglemix_env(split)) as url:
            entry = {"dense_first_layers": split}
            for name, doc in docs.items():
                entry[name] = compare_logprobs(dense_logprobs[name], prompt_logprobs(url, doc),
                                               targets[name])
        result["split_search"].append(entry)
        log(f"split {split}: text top1 {entry['text']['top1_agreement']:.3f} "
            f"KL {entry['text']['kl_mean']:.4f}; repeat ppl {entry['repeat']['ppl_method']:.2f}"
            f" (dense {entry['repeat']['ppl_dense']:.2f})")
        save(result)

    acceptable = [s for s in result["split_search"]
                  if s["text"]["top1_agreement"] >= 0.95
                  and s["repeat"]["ppl_method"] <= 1.10 * s["repeat"]["ppl_dense"]]
    chosen = min((s["dense_first_layers"] for s in acceptable), default=max(args.splits))
    result["chosen_split"] = chosen
    result["split_rule"] = ("smallest dense_first_layers with text top-1 agreement >= 0.95 and "
                            "repeat-document perplexity within 10% of dense; else the largest")
    log(f"chosen split: dense_first_layers={chosen}; tasks")
    with served(settings, model_path, trianglemix_env(chosen)) as url:
        method_rows = run_tasks(url, cases)
    result["trianglemix_rows"] = method_rows
    result["accuracy"] = {"dense": accuracy_table(dense_rows),
                          "trianglemix": accuracy_table(method_rows)}
    result["lost_cases"] = lost_cases(dense_rows, method_rows)
    save(result)

    log("negative control: sinks + window only, every layer, passkey 4K")
    with served(settings, model_path,
                trianglemix_env(0, last_q_tokens=0)) as url:
        negative_rows = run_tasks(url, negative_cases)
    dense_negative = [row for row in dense_rows
                      if row["task"] == "passkey" and row["target_tokens"] == 4096]
    result["negative_control"] = {
        "config": "dense_first_layers=0, last_q_tokens=0 (sinks 8 + window 512 only)",
        "passkey_4096_accuracy": sum(r["passed"] for r in negative_rows) / len(negative_rows),
        "dense_passkey_4096_accuracy": (sum(r["passed"] for r in dense_negative)
                                        / max(len(dense_negative), 1)),
        "rows": negative_rows,
    }
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(result)
    plot(result)
    log(f"accuracy dense {result['accuracy']['dense']}")
    log(f"accuracy trianglemix {result['accuracy']['trianglemix']}")
    log(f"lost cases: {len(result['lost_cases'])}; negative control passkey 4K: "
        f"{result['negative_control']['passkey_4096_accuracy']:.0%}")


if __name__ == "__main__":
    main()
