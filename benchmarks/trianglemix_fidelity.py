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

Merge mode adds to the existing JSON instead of starting over (nothing else is re-run):
--add-tasks runs dense and --split (default: the chosen split) on those tasks only,
--add-splits extends the split search (dense logprobs are recomputed: they are not stored),
--tasks-at-split runs the whole stored task suite with TriangleMix at another split against
the stored dense rows (dense is not re-run; the rebuilt prompts must match the stored cases).
Task rows are kept per split (`task_rows_by_split`). The rule's split replaces the chosen one
once it has run the whole suite and loses no case dense gets right (`chosen_split_reason`);
`trianglemix_rows`, `accuracy` and `lost_cases` describe the chosen split. Tables and the plot
are rebuilt from all rows; each merge run is recorded under "runs".

    .venv/bin/python benchmarks/trianglemix_fidelity.py --add-tasks variable_lookup multi_key \
        --add-splits 24 26
    .venv/bin/python benchmarks/trianglemix_fidelity.py --tasks-at-split 24
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from longctx_suite import TokenCounter, build_cases  # noqa: E402

from server.config import ServerSettings  # noqa: E402
from server.launcher import one_worker, resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "trianglemix_fidelity.json"
MODEL = "smollm2-135m-instruct"
NUM_LAYERS = 30
TOP_LOGPROBS = 20
BUCKET_TOKENS = 1024
TEXT_DOC = "/usr/share/common-licenses/GPL-3"
REPEAT_DOC = "/usr/share/common-licenses/GFDL-1.3"
CASE_KEY = ("task", "target_tokens", "index")


_out_json = OUT_JSON


def out_json() -> Path:
    """The results file of this run (``--out``); the PNG sits beside it."""
    return _out_json


def log(message: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def trianglemix_env(dense_first_layers: int, **overrides: int) -> dict[str, str]:
    env = {"TESSERA_ATTENTION_METHOD": "trianglemix",
           "TESSERA_ATTENTION_DENSE_FIRST_LAYERS": str(dense_first_layers)}
    env.update({f"TESSERA_ATTENTION_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


def token_counter(url: str) -> TokenCounter:
    def count_tokens(text: str) -> int:
        return len(httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text},
                              timeout=300).json()["tokens"])

    return count_tokens


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


def split_fidelity(settings: ServerSettings, model_path: Path, split: int, docs: dict[str, str],
                   dense_logprobs: dict[str, list], targets: dict[str, list[int]]) -> dict:
    """Logit fidelity vs dense of one dense_first_layers split, on every document."""
    with one_worker(settings, model_path, trianglemix_env(split)) as url:
        entry: dict = {"dense_first_layers": split}
        for name, doc in docs.items():
            entry[name] = compare_logprobs(dense_logprobs[name], prompt_logprobs(url, doc),
                                           targets[name])
    return entry


def meets_split_rule(entry: dict) -> bool:
    return (entry["text"]["top1_agreement"] >= 0.95
            and entry["repeat"]["ppl_method"] <= 1.10 * entry["repeat"]["ppl_dense"])


# --- tasks
def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


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
                     "prompt_sha256": prompt_sha256(case.prompt),
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


def case_key(row: dict) -> tuple:
    return tuple(row[k] for k in CASE_KEY)


def lost_cases(dense_rows: list[dict], method_rows: list[dict]) -> list[dict]:
    """Cases dense gets right that the method gets wrong (paired by task, length, index)."""
    dense = {case_key(row): row for row in dense_rows}
    return [{k: m[k] for k in ("task", "target_tokens", "index", "depth", "answer",
                               "completion")}
            for m in method_rows if dense[case_key(m)]["passed"] and not m["passed"]]


def save(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json().write_text(json.dumps(result, indent=2))


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The bar chart gets the most room: one group of bars per task and length.
    fig, axes = plt.subplots(1, 3, figsize=(20, 5), width_ratios=[1, 1, 2])
    splits = sorted(result["split_search"], key=lambda s: s["dense_first_layers"])
    names = [str(s["dense_first_layers"]) for s in splits]
    axes[0].plot(names, [s["text"]["top1_agreement"] for s in splits], "o-", label="top-1, text")
    axes[0].plot(names, [s["repeat"]["top1_agreement"] for s in splits], "o-",
                 label="top-1, repeat doc")
    axes[0].plot(names, [s["text"]["kl_mean"] for s in splits], "s--", label="KL, text")
    axes[0].plot(names, [s["repeat"]["kl_mean"] for s in splits], "s--", label="KL, repeat")
    axes[0].axhline(0.95, color="grey", linewidth=0.8, linestyle=":", label="rule: text top-1")
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
        # One bar per series and cell: dense, then every split that ran the tasks.
        by_split = result.get("accuracy_by_split") or {str(chosen): accuracy["trianglemix"]}
        series = [("dense", accuracy["dense"])] + [
            (f"TriangleMix, split {split}" + (" (chosen)" if int(split) == chosen else ""),
             by_split[split]) for split in sorted(by_split, key=int)]
        labels, cells = [], []
        for task, task_cells in accuracy["dense"].items():
            name = task.replace("_", "\n")  # long task names on two lines, so they do not overlap
            for length in sorted(task_cells, key=int):
                labels.append(f"{name}\n{length}")
                cells.append((task, length))
        positions = range(len(labels))
        # Hatched: dense below 80%, a cell that does not count (DESIGN.md, "Fidelity").
        hatches = ["" if accuracy["dense"][task][length] >= 0.8 else "//"
                   for task, length in cells]
        width = 0.8 / len(series)
        for number, (label, table) in enumerate(series):
            offset = (number - (len(series) - 1) / 2) * width
            axes[2].bar([p + offset for p in positions],
                        [table.get(task, {}).get(length, 0) for task, length in cells], width,
                        label=label, hatch=hatches)
        axes[2].set_xticks(list(positions), labels, fontsize=7)
        axes[2].set(ylabel="accuracy", ylim=(0, 1.05),
                    title="completion-style retrieval (hatched: dense < 80%, not counted)")
        axes[2].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out_json().with_suffix(".png"), dpi=120)


# --- merge mode
def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` plus `new`; a re-run case (same task, length, index) replaces its old row."""
    replaced = {case_key(row) for row in new}
    return [row for row in old if case_key(row) not in replaced] + new


def refresh_tables(result: dict) -> None:
    """Accuracy and lost cases per split, the splits meeting the rule and the chosen split,
    from every stored row; the top-level task keys then describe the chosen split."""
    result["split_search"].sort(key=lambda entry: entry["dense_first_layers"])
    result["splits_meeting_rule"] = [entry["dense_first_layers"]
                                     for entry in result["split_search"]
                                     if meets_split_rule(entry)]
    by_split = result["task_rows_by_split"]
    result["accuracy_by_split"] = {split: accuracy_table(rows) for split, rows in by_split.items()}
    result["lost_cases_by_split"] = {split: lost_cases(result["dense_rows"], rows)
                                     for split, rows in by_split.items()}
    choose_split(result)
    chosen = str(result["chosen_split"])
    result["trianglemix_rows"] = by_split[chosen]
    result["accuracy"] = {"dense": accuracy_table(result["dense_rows"]),
                          "trianglemix": result["accuracy_by_split"][chosen]}
    result["lost_cases"] = result["lost_cases_by_split"][chosen]


def choose_split(result: dict) -> None:
    """The split rule's pick replaces the chosen split once it has run every stored task case
    and loses none that dense gets right; otherwise the chosen split stays, with the reason."""
    rule = min(result["splits_meeting_rule"],
               default=max(entry["dense_first_layers"] for entry in result["split_search"]))
    chosen = result["chosen_split"]
    rows = result["task_rows_by_split"].get(str(rule), [])
    complete = {case_key(row) for row in rows} == {case_key(row) for row in result["dense_rows"]}
    lost = len(result["lost_cases_by_split"].get(str(rule), []))
    if rule == chosen:
        reason = f"split {rule} is the split rule's pick; its tasks lose {lost} case(s)"
    elif complete and not lost:
        result["chosen_split"] = rule
        reason = (f"split {rule} is the split rule's pick and loses no task case dense gets "
                  f"right (replaces {chosen})")
    elif not complete:
        reason = f"split {chosen} kept: the rule picks {rule}, which has not run every task case"
    else:
        reason = (f"split {chosen} kept: the rule picks {rule}, which loses {lost} task "
                  f"case(s) dense gets right")
    result["chosen_split_reason"] = reason


def load_result() -> dict:
    """The stored result; files written before task rows were kept per split hold only the
    chosen split's rows."""
    result = json.loads(out_json().read_text())
    result.setdefault("task_rows_by_split",
                      {str(result["chosen_split"]): result["trianglemix_rows"]})
    return result


def record_run(result: dict, args: argparse.Namespace) -> dict:
    """A new entry under "runs"; the first (full) run is recorded from its top-level keys."""
    runs = result.setdefault("runs", [{"mode": "full", "started_at": result["started_at"],
                                       "finished_at": result.get("finished_at"),
                                       "args": result["args"]}])
    # Only the arguments merge mode reads (--tasks and --splits belong to the full run).
    used = ("add_tasks", "add_splits", "split", "tasks_at_split", "lengths", "cases",
            "doc_tokens")
    run: dict = {"mode": "merge", "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "args": {key: vars(args)[key] for key in used}}
    runs.append(run)
    return run


def check_prompts(cases: list, dense_rows: list[dict], count_tokens: TokenCounter) -> None:
    """The rebuilt cases must be the stored dense cases: the same case keys, and per case the
    same answer, needle depth, prompt length in tokens and prompt sha256. Rows stored without
    a hash cannot be checked byte for byte: their dense run must be repeated."""
    dense = {case_key(row): row for row in dense_rows}
    rebuilt = {(case.task, case.target_tokens, case.index): case for case in cases}
    if rebuilt.keys() != dense.keys():
        raise SystemExit("rebuilt cases are not the stored dense cases")

    unhashed = [key for key, row in dense.items() if "prompt_sha256" not in row]
    if unhashed:
        raise SystemExit(f"{len(unhashed)} stored dense rows have no prompt sha256 (e.g. "
                         f"{unhashed[:2]}): run dense again (a fresh run) to store them")

    def matches(case, row: dict) -> bool:
        return ((case.answer, case.depth, count_tokens(case.prompt), prompt_sha256(case.prompt))
                == (row["answer"], row["depth"], row["prompt_tokens"], row["prompt_sha256"]))

    differ = [key for key, case in rebuilt.items() if not matches(case, dense[key])]
    if differ:
        raise SystemExit(f"{len(differ)} rebuilt prompts differ from the stored dense rows, "
                         f"e.g. {differ[:3]}")


def tasks_at_split(args: argparse.Namespace, settings: ServerSettings, model_path: Path) -> None:
    """Merge mode: the whole stored task suite with TriangleMix at one more split; the stored
    dense rows are the reference (dense is not re-run)."""
    result = load_result()
    run = record_run(result, args)
    split = args.tasks_at_split
    dense_rows = result["dense_rows"]
    tasks = list(dict.fromkeys(row["task"] for row in dense_rows))
    lengths = sorted({row["target_tokens"] for row in dense_rows})
    per_cell = max(row["index"] for row in dense_rows) + 1
    with one_worker(settings, model_path, trianglemix_env(split)) as url:
        count_tokens = token_counter(url)
        cases = [case for task in tasks for length in lengths
                 for case in build_cases(task, length, per_cell, count_tokens)]
        check_prompts(cases, dense_rows, count_tokens)
        log(f"split {split}: {len(cases)} task cases, prompts match the stored dense rows")
        started = time.perf_counter()
        rows = run_tasks(url, cases)
        wall = time.perf_counter() - started
    for row in rows:
        row["dense_first_layers"] = split
    result["task_rows_by_split"][str(split)] = rows
    run["tasks"] = {"split": split, "cases": len(rows), "dense": "stored rows, not re-run",
                    "prompt_check": ("case keys, answers, depths, prompt tokens and prompt "
                                     "sha256 match the stored dense rows"),
                    "cpu_seconds": {"trianglemix": sum(r["seconds"] for r in rows)},
                    "wall_seconds": wall}
    run["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    refresh_tables(result)
    save(result)
    plot(result)
    log(f"accuracy dense {result['accuracy']['dense']}")
    log(f"accuracy split {split} {result['accuracy_by_split'][str(split)]}")
    log(f"lost cases at split {split}: {len(result['lost_cases_by_split'][str(split)])}; "
        f"{result['chosen_split_reason']}")


def merge(args: argparse.Namespace, settings: ServerSettings, model_path: Path) -> None:
    result = load_result()
    chosen = result["chosen_split"]
    split = chosen if args.split is None else args.split
    run = record_run(result, args)

    with one_worker(settings, model_path, {"TESSERA_ATTENTION_METHOD": "dense"}) as url:
        count_tokens = token_counter(url)
        cases = [case for task in args.add_tasks or [] for length in args.lengths
                 for case in build_cases(task, length, args.cases, count_tokens)]
        if args.add_splits:
            docs = load_documents(url, args.doc_tokens)
            targets = {name: actual_token_ids(url, doc) for name, doc in docs.items()}
            log("dense: logprobs on the documents")
            dense_logprobs = {name: prompt_logprobs(url, doc) for name, doc in docs.items()}
        log(f"dense: {len(cases)} task cases")
        dense_rows = run_tasks(url, cases)

    if cases:
        log(f"split {split}: {len(cases)} task cases")
        with one_worker(settings, model_path, trianglemix_env(split)) as url:
            method_rows = run_tasks(url, cases)
        for row in method_rows:
            row["dense_first_layers"] = split
        result["dense_rows"] = merge_rows(result["dense_rows"], dense_rows)
        by_split = result["task_rows_by_split"]
        by_split[str(split)] = merge_rows(by_split.get(str(split), []), method_rows)
        run["tasks"] = {"split": split, "cases": len(cases),
                        "cpu_seconds": {"dense": sum(r["seconds"] for r in dense_rows),
                                        "trianglemix": sum(r["seconds"] for r in method_rows)}}
        refresh_tables(result)
        save(result)

    stored = {entry["dense_first_layers"]: entry for entry in result["split_search"]}
    for split in args.add_splits or []:
        log(f"split {split}: logprobs")
        entry = split_fidelity(settings, model_path, split, docs, dense_logprobs, targets)
        # Dense is recomputed here; it must match the stored runs' dense on the same documents.
        reference = stored.get(chosen)
        if reference is not None:
            run.setdefault("dense_ppl_check", {name: {
                "this_run": entry[name]["ppl_dense"], "stored": reference[name]["ppl_dense"]}
                for name in docs})
        stored[split] = entry
        result["split_search"] = list(stored.values())
        refresh_tables(result)
        log(f"split {split}: text top1 {entry['text']['top1_agreement']:.3f} "
            f"KL {entry['text']['kl_mean']:.4f}; repeat ppl {entry['repeat']['ppl_method']:.2f}"
            f" (dense {entry['repeat']['ppl_dense']:.2f}); meets rule: {meets_split_rule(entry)}")
        save(result)

    run["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    refresh_tables(result)
    save(result)
    plot(result)
    log(f"accuracy dense {result['accuracy']['dense']}")
    log(f"accuracy trianglemix {result['accuracy']['trianglemix']}")
    log(f"lost cases: {len(result['lost_cases'])}; splits meeting the rule: "
        f"{result['splits_meeting_rule']}; {result['chosen_split_reason']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7168])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", default=["passkey", "variable_lookup", "multi_key"])
    parser.add_argument("--splits", type=int, nargs="+", default=[8, 15, 22])
    parser.add_argument("--doc-tokens", type=int, default=6144)
    parser.add_argument("--add-tasks", nargs="+", metavar="TASK",
                        help="merge mode: task accuracy for these tasks only, dense vs --split")
    parser.add_argument("--add-splits", type=int, nargs="+", metavar="N",
                        help="merge mode: extend the split search with these splits")
    parser.add_argument("--split", type=int,
                        help="split for --add-tasks (default: the stored chosen split)")
    parser.add_argument("--tasks-at-split", type=int, metavar="N",
                        help="merge mode: the stored task suite at split N, vs the stored dense")
    parser.add_argument("--out", type=Path, default=OUT_JSON,
                        help="results JSON (the PNG is written beside it)")
    args = parser.parse_args()
    global _out_json
    _out_json = args.out

    settings = ServerSettings(workers=1, kv_cache_space_gib=2, max_model_len=8192)
    model_path = resolve_model_path(settings)
    if args.tasks_at_split is not None:
        tasks_at_split(args, settings, model_path)
        return
    if args.add_tasks or args.add_splits:
        merge(args, settings, model_path)
        return
    result: dict = {"benchmark": "trianglemix_fidelity", "model": MODEL,
                    "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "pattern": {"sink_tokens": 8, "window_tokens": 512, "last_q_tokens": 128},
                    "last_q_rows": ("the prompt's own last rows (the backend reads prompt "
                                    "lengths from vLLM's model runner; chunked prefill, 2048 "
                                    "tokens a step, included)"),
                    "args": {key: str(value) for key, value in vars(args).items()}}
    with one_worker(settings, model_path, {"TESSERA_ATTENTION_METHOD": "dense"}) as url:
        count_tokens = token_counter(url)
        docs = load_documents(url, args.doc_tokens)
        targets = {name: actual_token_ids(url, doc) for name, doc in docs.items()}
        log("dense: logprobs on the documents")
        dense_logprobs = {name: prompt_logprobs(url, doc) for name, doc in docs.items()}

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
        entry = split_fidelity(settings, model_path, split, docs, dense_logprobs, targets)
        result["split_search"].append(entry)
        log(f"split {split}: text top1 {entry['text']['top1_agreement']:.3f} "
            f"KL {entry['text']['kl_mean']:.4f}; repeat ppl {entry['repeat']['ppl_method']:.2f}"
            f" (dense {entry['repeat']['ppl_dense']:.2f})")
        save(result)

    acceptable = [s for s in result["split_search"] if meets_split_rule(s)]
    chosen = min((s["dense_first_layers"] for s in acceptable), default=max(args.splits))
    result["chosen_split"] = chosen
    result["split_rule"] = ("smallest dense_first_layers with text top-1 agreement >= 0.95 and "
                            "repeat-document perplexity within 10% of dense; else the largest")
    log(f"chosen split: dense_first_layers={chosen}; tasks")
    with one_worker(settings, model_path, trianglemix_env(chosen)) as url:
        method_rows = run_tasks(url, cases)
    result["task_rows_by_split"] = {str(chosen): method_rows}
    refresh_tables(result)
    save(result)

    log("negative control: sinks + window only, every layer, passkey 4K")
    with one_worker(settings, model_path,
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
