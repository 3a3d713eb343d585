"""tessera's CUDA backend inside real vLLM 0.26 on the GPU host, real SmolLM2-135M weights.

All servers share the one GPU (fixed KV budget each) and are up at once:
- `fa3`: vLLM's own FlashAttention backend; `dense`: tessera's backend (CUSTOM) in dense mode.
  Same tokens? Greedy completions of the same prompts, sent one at a time to each.
- `tri<N>`: TriangleMix with layers [0, N) dense, for every candidate split (the paper's 50%
  split 15 included), and `negative`: sinks + window only in every layer (no last rows).
  Logit fidelity vs `dense` on long real text and on a repeat document (KL, top-1, perplexity),
  then the completion-style task suite (benchmarks/longctx_suite.py) at 2K/4K/7K with
  --cases a cell on byte-identical prompts (sha256 stored), lost cases counted.
- Per-layer usage counters from each tessera server: which path every layer's rows took.
Prefill runs in 2048-token chunks (--max-num-batched-tokens), so the pattern measured is the
chunked one, with the prompt's own last rows.

    . scripts/gpu/setup.sh && python3 benchmarks/gpu_smollm2_serving.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trianglemix_fidelity as fid  # noqa: E402
from gpu_servers import GpuServer, grep_log, wait_healthy  # noqa: E402
from longctx_suite import build_cases  # noqa: E402

from attention_backends.usage import total_usage  # noqa: E402

MODEL = fid.MODEL
LOG_DIR = Path("/root/smollm2_logs")
NUM_LAYERS = 30
COMMON_ARGS = ["--dtype", "bfloat16", "--max-model-len", "8192",
               "--max-num-batched-tokens", "2048", "--gpu-memory-utilization", "0.06",
               "--kv-cache-memory-bytes", str(3 << 30)]
EQUALITY_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three laws of thermodynamics are", "Translate to French: The cat sits on the mat.",
    "List five prime numbers:", "import numpy as np\n\ndef softmax(x):",
    "The mitochondria is", "Q: What is 17 times 23?\nA:", "A haiku about the sea:\n",
]


def servers_for(splits: list[int], stats_root: Path, base_port: int) -> list[GpuServer]:
    def tessera(name: str, env: dict[str, str]) -> GpuServer:
        stats = stats_root / name
        return GpuServer(name, 0, [*COMMON_ARGS, "--attention-backend", "CUSTOM"],
                         {"TESSERA_ATTENTION_STATS_DIR": str(stats), **env})

    servers = [GpuServer("fa3", 0, [*COMMON_ARGS, "--attention-backend", "FLASH_ATTN"]),
               tessera("dense", {"TESSERA_ATTENTION_METHOD": "dense"})]
    servers += [tessera(f"tri{split}", fid.trianglemix_env(split)) for split in splits]
    servers.append(tessera("negative", fid.trianglemix_env(0, last_q_tokens=0)))
    for offset, server in enumerate(servers):
        server.port = base_port + offset
    return servers


def completion(url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "seed": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()


def equality(fa3: GpuServer, dense: GpuServer, long_prompts: list[str]) -> dict:
    """Greedy tokens of vLLM's FA3 backend vs tessera's backend in dense mode."""
    rows = []
    for prompt in EQUALITY_PROMPTS + long_prompts:
        texts = [completion(s.url, prompt, 48)["choices"][0]["text"] for s in (fa3, dense)]
        rows.append({"prompt_sha256": fid.prompt_sha256(prompt), "prompt_chars": len(prompt),
                     "fa3": texts[0], "tessera_dense": texts[1], "same": texts[0] == texts[1]})
    return {"prompts": len(rows), "identical": sum(r["same"] for r in rows), "rows": rows}


def run_cases(url: str, cases: list, workers: int = 1) -> list[dict]:
    """Every case's greedy completion, one request at a time by default: batches of other
    cases change bf16 results (on 2026-12-01, 32 requests in flight made 21 of 600 dense
    completions differ between two runs, 3 of them pass/fail), and that noise would be
    counted as cases the pattern lost."""
    def one(case) -> dict:
        reply = completion(url, case.prompt, 12)
        text = reply["choices"][0]["text"]
        return {"task": case.task, "target_tokens": case.target_tokens, "index": case.index,
                "depth": case.depth, "prompt_tokens": reply["usage"]["prompt_tokens"],
                "prompt_sha256": fid.prompt_sha256(case.prompt), "answer": case.answer,
                "completion": text, "passed": case.passed(text)}

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, cases))


def accuracy(rows: list[dict]) -> dict[str, dict[str, float]]:
    cells: dict[str, dict[str, list[bool]]] = {}
    for row in rows:
        cells.setdefault(row["task"], {}).setdefault(str(row["target_tokens"]), []).append(
            row["passed"])
    return {task: {length: sum(v) / len(v) for length, v in by_len.items()}
            for task, by_len in cells.items()}


def lost_cases(dense_rows: list[dict], method_rows: list[dict]) -> list[dict]:
    """Cases dense gets right that the method loses, only in cells where dense >= 80%."""
    dense_acc = accuracy(dense_rows)
    method = {(r["task"], r["target_tokens"], r["index"]): r for r in method_rows}
    lost = []
    for row in dense_rows:
        key = (row["task"], row["target_tokens"], row["index"])
        other = method[key]
        assert other["prompt_sha256"] == row["prompt_sha256"], key  # byte-identical prompts
        if (dense_acc[row["task"]][str(row["target_tokens"])] >= 0.8 and row["passed"]
                and not other["passed"]):
            lost.append({"case": list(key), "dense": row["completion"],
                         "method": other["completion"]})
    return lost


def plot(result: dict, png: Path) -> None:
    """Task accuracy per cell for dense and every split, and the logit rule per split (run
    where matplotlib is: `--plot-only results/gpu_smollm2_serving.json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy_by_name = result["accuracy"]
    names = list(accuracy_by_name)
    cells = [(task, length) for task, by_len in accuracy_by_name["dense"].items()
             for length in by_len]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5),
                                      gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        xs = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(cells))]
        lost = len(result["lost_cases"].get(name, []))
        label = name if name == "dense" else f"{name} ({lost} lost)"
        left.bar(xs, [accuracy_by_name[name][task][length] for task, length in cells], width,
                 label=label)
    negative = result["negative_control"]
    left.scatter([cells.index(("passkey", "4096"))], [negative["passkey_4096"]], marker="x",
                 color="black", zorder=3, label="negative control (no last rows, no dense layers)")
    left.set_xticks(range(len(cells)), [f"{t.replace('_', ' ')}\n{int(n) // 1024}K"
                                        for t, n in cells], fontsize=7)
    left.set_ylabel(f"accuracy ({result['args'].get('cases', '?')} cases a cell)")
    left.set_title("SmolLM2-135M in vLLM 0.26 on the H200, chunked prefill (2048)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    splits = [entry["dense_first_layers"] for entry in result["split_search"]]
    top1 = [entry["text"]["top1_agreement"] for entry in result["split_search"]]
    ppl_ratio = [entry["repeat"]["ppl_method"] / entry["repeat"]["ppl_dense"]
                 for entry in result["split_search"]]
    right.plot(splits, top1, "o-", label="text top-1 agreement with dense")
    right.plot(splits, ppl_ratio, "s--", label="repeat-doc perplexity / dense")
    right.axhline(0.95, color="gray", lw=0.8, ls=":")
    right.axhline(1.10, color="gray", lw=0.8, ls=":")
    right.set_xlabel("dense first layers (of 30)")
    right.set_title(f"split rule (dotted); chosen: {result.get('chosen_split')}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON, run nothing")
    parser.add_argument("--model", default="/root/models/smollm2")
    parser.add_argument("--docs", type=Path, default=Path("/root/stash/docs"))
    parser.add_argument("--splits", type=int, nargs="+", default=[15, 24, 26, 28])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7168])
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--tasks", nargs="+",
                        default=["passkey", "needle_prose", "variable_lookup", "multi_key"])
    parser.add_argument("--base-port", type=int, default=8300)
    args = parser.parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    if args.out is None:
        parser.error("--out is required")
    # `timeout` sends SIGTERM: leave through `finally` (stop servers, save, archive logs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    fid.TEXT_DOC, fid.REPEAT_DOC = str(args.docs / "GPL-3"), str(args.docs / "GFDL-1.3")
    result: dict = {"benchmark": "gpu_smollm2_serving", "date": time.strftime("%Y-%m-%d"),
                    "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to bf16)",
                    "server_args": COMMON_ARGS, "args": {k: str(v) for k, v in vars(args).items()}}
    out_json = args.out / "gpu_smollm2_serving.json"

    def save() -> None:
        out_json.write_text(json.dumps(result, indent=1))

    # Cases first, counted in-process with the served tokenizer (the same tokenizer.json and
    # special tokens as the server's /tokenize): the case builder counts thousands of times,
    # and on 2026-12-01 doing it over HTTP, or with eight servers already up and competing
    # for the host's CPUs, did not finish within a call.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    started = time.monotonic()
    cases = [case for task in args.tasks for length in args.lengths
             for case in build_cases(task, length, args.cases, count_tokens)]
    result["case_build_s"] = round(time.monotonic() - started, 1)
    print(f"[smollm2] {len(cases)} cases built in {result['case_build_s']} s", flush=True)
    servers = servers_for(args.splits, LOG_DIR / "stats", args.base_port)
    by_name = {server.name: server for server in servers}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    try:
        for server in servers:
            if server.is_up():  # left running by an earlier call (own session)
                server.log_path = LOG_DIR / f"server-{server.name}.log"
            else:
                server.start(args.model, MODEL, LOG_DIR)
        wait_healthy(servers)
        result["healthy_after_s"] = {s.name: s.healthy_after_s for s in servers}
        result["backend_log_lines"] = {
            s.name: grep_log(s, "attention backend", "Using AttentionBackendEnum", "tessera",
                             "block size", "FlashAttention version")
            for s in servers}
        dense_url = by_name["dense"].url
        long_prompts = [case.prompt for case in cases if case.index == 0][:6]
        print("[smollm2] token equality fa3 vs tessera dense", flush=True)
        result["equality_fa3_vs_tessera_dense"] = equality(by_name["fa3"], by_name["dense"],
                                                           long_prompts)
        save()
        print("[smollm2] logit fidelity", flush=True)
        docs = fid.load_documents(dense_url, 6144)
        targets = {name: fid.actual_token_ids(dense_url, doc) for name, doc in docs.items()}
        dense_lp = {name: fid.prompt_logprobs(dense_url, doc) for name, doc in docs.items()}
        result["split_search"] = []
        for split in args.splits:
            url = by_name[f"tri{split}"].url
            entry = {"dense_first_layers": split}
            for name, doc in docs.items():
                entry[name] = fid.compare_logprobs(dense_lp[name], fid.prompt_logprobs(url, doc),
                                                   targets[name])
            entry["meets_rule"] = fid.meets_split_rule(entry)
            result["split_search"].append(entry)
            print(f"  split {split}: text top1 {entry['text']['top1_agreement']:.3f} KL "
                  f"{entry['text']['kl_mean']:.4f} repeat ppl {entry['repeat']['ppl_method']:.2f}"
                  f" (dense {entry['repeat']['ppl_dense']:.2f})", flush=True)
        save()
        print(f"[smollm2] task suite: {len(cases)} cases per server", flush=True)
        names = ["dense", *[f"tri{s}" for s in args.splits]]
        started = time.monotonic()
        with ThreadPoolExecutor(len(names)) as pool:
            rows = dict(zip(names, pool.map(lambda n: run_cases(by_name[n].url, cases), names),
                            strict=True))
        result["task_wall_s"] = round(time.monotonic() - started, 1)
        # Noise control: the dense server again, same cases, after the others ran. Lost
        # cases here are what run-to-run numerics alone cost.
        dense_again = run_cases(dense_url, cases)
        result["dense_repeatability"] = {
            "completions_differing": sum(a["completion"] != b["completion"]
                                         for a, b in zip(rows["dense"], dense_again, strict=True)),
            "lost_cases": lost_cases(rows["dense"], dense_again)}
        negative_cases = [c for c in cases if c.task == "passkey" and c.target_tokens == 4096]
        negative_rows = run_cases(by_name["negative"].url, negative_cases)
        result["dense_rows"] = rows["dense"]
        result["accuracy"] = {name: accuracy(r) for name, r in rows.items()}
        result["lost_cases"] = {name: lost_cases(rows["dense"], rows[name]) for name in names[1:]}
        result["task_rows_by_split"] = {name: rows[name] for name in names[1:]}
        result["negative_control"] = {
            "config": "dense_first_layers=0, last_q_tokens=0 (sinks 8 + window 512 only)",
            "passkey_4096": statistics.mean(r["passed"] for r in negative_rows),
            "dense_passkey_4096": result["accuracy"]["dense"]["passkey"]["4096"]}
        acceptable = [entry["dense_first_layers"] for entry in result["split_search"]
                      if entry["meets_rule"]
                      and not result["lost_cases"][f"tri{entry['dense_first_layers']}"]]
        result["chosen_split"] = min(acceptable, default=None)
        result["split_rule"] = ("smallest dense_first_layers with text top-1 >= 0.95, repeat "
                                "perplexity within 10% of dense, and no task case lost")
        time.sleep(1)
        result["usage"] = {s.name: total_usage(LOG_DIR / "stats" / s.name)
                           for s in servers if s.name != "fa3"}
        save()
        eq = result["equality_fa3_vs_tessera_dense"]
        print(f"[smollm2] fa3 vs tessera dense identical: {eq['identical']}/{eq['prompts']}")
        for name in names:
            print(f"  {name}: {result['accuracy'][name]}")
        print(f"  lost: { {k: len(v) for k, v in result['lost_cases'].items()} }")
        print(f"  dense vs dense again: {result['dense_repeatability']['completions_differing']}"
              f" completions differ, {len(result['dense_repeatability']['lost_cases'])} lost")
        print(f"  negative control passkey 4K: {result['negative_control']}")
        print(f"  chosen split: {result['chosen_split']}")
    finally:
        for server in servers:
            server.stop()
        save()
        # One archive of logs and usage files: the device returns at most 8 files.
        subprocess.run(["tar", "-czf", str(args.out / "smollm2_logs.tar.gz"), "-C",
                        str(LOG_DIR.parent), LOG_DIR.name], check=False)


if __name__ == "__main__":
    main()
