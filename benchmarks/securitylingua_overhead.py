"""SecurityLingua's cost on the request path, at prompts of ~100 / 1K / 4K served-model tokens.

1. Stage latency (what the gateway spends in the stage, asyncio hop included): N calls per
   length after a warm-up, p50 / p99, for each extractor setting in VARIANTS, all at 1 torch
   thread: the previous default (fp32, 512-piece chunks, words tokenized on every call) and
   the int8 variant it was compared with, the new default (`quantize: auto` = bf16 on this
   CPU, 256-piece chunks) with the word-piece cache warm and cold (cleared before every
   call: every word new), and fp32 / int8 at 256-piece chunks (what a CPU without native
   bf16 runs). The cells are timed in `--repeats` rounds, variants interleaved within a
   round; each figure is the median over the rounds of that round's p50 (p99).
2. Tokens added: the worker's own count (vLLM `/tokenize` on the chat messages) with and
   without the stage's system message (SmolLM2's template otherwise inserts its default one).
3. The served model's prefill for the same prompt: time to the first token of one real
   SmolLM2 worker (max_tokens=1, median of 3), for the original and the annotated request.
Targets (issue 20): stage p50 <= 20 ms at 1K tokens, and < 5% of that prompt's prefill.
Run it alone: `flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python
benchmarks/securitylingua_overhead.py`. Writes benchmarks/results/securitylingua_overhead.*
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry  # noqa: E402

from prompt_pipeline.config import SecurityLinguaSettings  # noqa: E402
from prompt_pipeline.errors import PipelineError, PipelineResponse  # noqa: E402
from prompt_pipeline.securitylingua import sources  # noqa: E402
from prompt_pipeline.securitylingua.artifacts import (  # noqa: E402
    ATTENTION_HARM_CLASSIFIER,
    FULL_HARM_CLASSIFIER,
    SMALL_HARM_CLASSIFIER,
    SMALL_INTENTIONS_HARM_CLASSIFIER,
)
from prompt_pipeline.securitylingua.stage import build_securitylingua_stage  # noqa: E402
from prompt_pipeline.securitylingua.templates import dan_templates  # noqa: E402
from prompt_pipeline.stage import RequestContext  # noqa: E402
from prompt_pipeline.token_classifier.classifier import bf16_is_native  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import (  # noqa: E402
    free_port,
    resolve_model_path,
    start_worker,
    stop_workers,
    wait_until_healthy,
)
from server.schemas import ChatCompletionRequest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
LENGTHS = (100, 1000, 4000)
# (name, quantize setting, max_chunk_tokens setting, prompts): prompts "same" = one prompt
# per length, called again and again (warm word cache, repeated shapes); "cold" = the same
# prompt with the word-piece cache cleared before every call (every word new, as the
# previous code tokenized on every call); "distinct" = a different prompt on every call
# (1K tokens only), the closest to traffic.
BEFORE = "before: fp32, 512-piece chunks"
DEFAULT = "default: auto (bf16 here), 256-piece chunks"
VARIANTS = (
    (BEFORE, "none", 512, "cold"),
    ("before, a different prompt every call", "none", 512, "distinct"),
    ("before, int8: int8, 512-piece chunks", "int8", 512, "cold"),
    (DEFAULT, "auto", None, "same"),
    ("default, cold word cache", "auto", None, "cold"),
    ("default, a different prompt every call", "auto", None, "distinct"),
    ("fp32, 256-piece chunks", "none", None, "same"),
    ("int8, 256-piece chunks", "int8", None, "same"),
)
# Block mode (annotate + the harm classifier on the intention), the default extractor, one
# prompt repeated: (name, harm classifier artifact). The 1K prompt's request is harmful, so
# every call is refused; the refusal is part of what is timed.
BLOCK_VARIANTS = (
    ("block, attention-pooled harm head (0 layers)", ATTENTION_HARM_CLASSIFIER),
    ("block, full harm classifier (6 MiniLM layers)", FULL_HARM_CLASSIFIER),
    ("block, small harm classifier (MiniLM embeddings, 0 layers)", SMALL_HARM_CLASSIFIER),
    ("block, small harm classifier fitted also on training intentions",
     SMALL_INTENTIONS_HARM_CLASSIFIER),
)
WARM_UP_CALLS = 5
FILLER = ("The committee met on Tuesday to review the quarterly figures. Attendance was good "
          "and the minutes were approved without changes. ")


def prompt_of(tokens: int, counter: Tokenizer, request: str | None = None) -> str:
    """A jailbreak-shaped prompt of about `tokens` SmolLM2 tokens: background text, a DAN
    preamble when it fits, then a request (default: HarmBench's fourth) at the end; the
    fewest FILLERs that reach `tokens`."""
    request = request or sources.harmbench()[3]
    preamble = dan_templates()[0].replace("{instruction}", request)
    text = preamble if len(counter.encode(preamble).ids) < tokens else request

    def length(fillers: int) -> int:
        return len(counter.encode(FILLER * fillers + text).ids)

    fillers = max(0, (tokens - length(0)) // max(length(1) - length(0), 1))
    while fillers > 0 and length(fillers - 1) >= tokens:
        fillers -= 1
    while length(fillers) < tokens:
        fillers += 1
    return FILLER * fillers + text


def distinct_prompts(tokens: int, counter: Tokenizer, count: int) -> list[str]:
    """`count` prompts like `prompt_of`, each around a different AdvBench / HarmBench
    request: every call then brings a new length (new shapes) and some new words."""
    requests = [*sources.harmbench(), *sources.advbench()]
    if count > len(requests):
        raise ValueError(f"only {len(requests)} distinct requests")
    return [prompt_of(tokens, counter, request) for request in requests[:count]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


async def call_stage(stage, request, context: RequestContext):
    """The stage's output; a block-mode refusal (raised) counts as a finished call."""
    try:
        return await stage(request, context)
    except (PipelineError, PipelineResponse):
        return request


async def stage_latency(stage, requests: list, cold_words: bool) -> list[float]:
    """One call per request after WARM_UP_CALLS on the first. cold_words: forget every
    word's pieces before each call (outside the timing), so the call tokenizes the whole
    prompt, as the previous code did on every call."""
    for _ in range(WARM_UP_CALLS):
        await call_stage(stage, requests[0], RequestContext("warm", "chat"))
    samples = []
    for index, request in enumerate(requests):
        if cold_words:
            stage.extractor._word_pieces = {}
        started = time.perf_counter()
        await call_stage(stage, request, RequestContext(str(index), "chat"))
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


def chat_request(text: str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": text}]})


def messages_body(request: ChatCompletionRequest) -> list[dict]:
    return request.upstream_body()["messages"]


def worker_tokens(client: httpx.Client, url: str, messages: list[dict]) -> int:
    response = client.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages})
    response.raise_for_status()
    return response.json()["count"]


def prefill_ms(client: httpx.Client, url: str, messages: list[dict], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        client.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0,
        }).raise_for_status()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def time_variants(variants: list[str], text: str, runs: int) -> list[dict]:
    """compress() alone (no asyncio hop), 1 thread, for extractors not shipped."""
    from prompt_pipeline.token_classifier import TokenClassifier

    torch.set_num_threads(1)
    rows = []
    for variant in variants:
        name, spec = variant.split("=", 1)
        directory, _, quantize = spec.partition(":")
        classifier = TokenClassifier.load(directory, quantize or None)
        for _ in range(3):
            classifier.compress(text)
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            classifier.compress(text)
            samples.append((time.perf_counter() - started) * 1e3)
        rows.append({"variant": name, "p50_ms": round(percentile(samples, 50), 2),
                     "p99_ms": round(percentile(samples, 99), 2), "runs": runs})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100, help="calls per cell and round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (median taken)")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="also time compress() at 1K tokens for NAME=ARTIFACT_DIR[:int8]")
    parser.add_argument("--only", default=None,
                        help="time only the variants whose name contains this (e.g. block)")
    parser.add_argument("--no-prefill", action="store_true",
                        help="skip the worker (tokens added, prefill): stage latency only")
    parser.add_argument("--out", default="securitylingua_overhead",
                        help="results/<OUT>.json and .png")
    args = parser.parse_args()
    # (name, quantize, max_chunk_tokens, prompts, harm classifier or None = annotate mode)
    variants = [(*variant, None) for variant in VARIANTS] + [
        (name, "auto", None, "same", harm) for name, harm in BLOCK_VARIANTS]
    variants = [v for v in variants if args.only is None or args.only in v[0]]
    # Prefix caching off: repeated prompts would otherwise be cache hits, not prefills (our
    # first run measured 0.07 s for 1K tokens that way).
    settings = ServerSettings(workers=1, worker_extra_args=["--no-enable-prefix-caching"])
    model_path = resolve_model_path(settings)
    counter = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    stages = {name: build_securitylingua_stage(
        SecurityLinguaSettings(threads=1, quantize=quantize, max_chunk_tokens=chunk_tokens,
                               mode="block" if harm else "annotate", harm_classifier=harm),
        CollectorRegistry(), None) for name, quantize, chunk_tokens, _, harm in variants}
    requests = {length: chat_request(prompt_of(length, counter)) for length in LENGTHS}
    # Round r of a "distinct" variant calls prompts [r * runs, (r + 1) * runs): no prompt
    # twice, and the same prompts for every "distinct" variant.
    distinct = [chat_request(text) for text in distinct_prompts(
        1000, counter, args.runs * args.repeats + WARM_UP_CALLS)]
    rounds: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_index in range(args.repeats):
        for name, _, _, prompts, _ in variants:
            for length, request in requests.items():
                if prompts == "distinct":
                    if length != 1000:
                        continue
                    first = round_index * args.runs + WARM_UP_CALLS
                    calls = distinct[first:first + args.runs]
                else:
                    calls = [request] * args.runs
                samples = asyncio.run(stage_latency(stages[name], calls, prompts == "cold"))
                rounds.setdefault((name, length), []).append(
                    (percentile(samples, 50), percentile(samples, 99)))
            print(f"round {round_index + 1}/{args.repeats}", name, [
                round(rounds[(name, length)][-1][0], 2) for length in LENGTHS
                if (name, length) in rounds], flush=True)
    rows = []
    for name, quantize, _, prompts, harm in variants:
        stage = stages[name]
        for length, request in requests.items():
            if (name, length) not in rounds:
                continue
            # A blocked request is never forwarded; its row keeps the annotate-mode prompt
            # for the token and prefill columns.
            annotated = asyncio.run(call_stage(stage, request, RequestContext("x", "chat")))
            p50s = [p50 for p50, _ in rounds[(name, length)]]
            rows.append({"variant": name, "threads": 1, "quantize": quantize,
                         "mode": "block" if harm else "annotate",
                         "harm_classifier": harm.name if harm else None,
                         "precision": str(next(stage.extractor.model.parameters()).dtype)
                         if quantize != "int8" else "int8 linears",
                         "max_chunk_tokens": stage.extractor.max_chunk_tokens,
                         "prompts": prompts, "target_tokens": length,
                         "prompt_tokens": len(counter.encode(
                             request.messages[0].content).ids),
                         "stage_p50_ms": round(statistics.median(p50s), 2),
                         "stage_p99_ms": round(statistics.median(
                             p99 for _, p99 in rounds[(name, length)]), 2),
                         "stage_p50_ms_per_round": [round(p50, 2) for p50 in p50s],
                         "intention_words": len(annotated.messages[0].content.split()),
                         "_original": messages_body(request),
                         "_annotated": messages_body(annotated)})
            print(name, length, rows[-1]["stage_p50_ms"], rows[-1]["stage_p99_ms"], flush=True)

    variant_rows = time_variants(args.variants, prompt_of(1000, counter), args.runs // 4)
    if not args.no_prefill:
        worker = start_worker(settings, model_path, 0, port=free_port())
        try:
            wait_until_healthy([worker], timeout_s=600)
            with httpx.Client(timeout=600) as client:
                # Variants that extract the same intention share one measurement.
                plain_cache: dict[int, tuple[float, int]] = {}
                annotated_cache: dict[str, tuple[float, int]] = {}
                for row in rows:
                    original, annotated = row["_original"], row["_annotated"]
                    if row["target_tokens"] not in plain_cache:
                        prefill_ms(client, worker.url, original, repeats=1)  # warm-up
                        plain_cache[row["target_tokens"]] = (
                            prefill_ms(client, worker.url, original),
                            worker_tokens(client, worker.url, original))
                    key = json.dumps(annotated)
                    if key not in annotated_cache:
                        annotated_cache[key] = (prefill_ms(client, worker.url, annotated),
                                                worker_tokens(client, worker.url, annotated))
                    plain, plain_tokens = plain_cache[row["target_tokens"]]
                    annotated_ms, annotated_tokens = annotated_cache[key]
                    row.update({
                        "worker_prompt_tokens": plain_tokens,
                        "tokens_added": annotated_tokens - plain_tokens,
                        "prefill_ms": round(plain, 1),
                        "prefill_annotated_ms": round(annotated_ms, 1),
                        "stage_p50_share_of_prefill": round(row["stage_p50_ms"] / plain, 4),
                        "added_prefill_ms": round(annotated_ms - plain, 1),
                    })
        finally:
            stop_workers([worker])
    for row in rows:
        row.pop("_original")
        row.pop("_annotated")
    at_1k = [row for row in rows if row["target_tokens"] == 1000]
    report = {
        "script": "benchmarks/securitylingua_overhead.py", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "runs_per_cell_and_round": args.runs, "rounds": args.repeats,
        "command": " ".join(sys.argv[1:]),
        "torch": torch.__version__, "cpu_bf16_native": bf16_is_native(), "rows": rows,
        "extractor_variants_at_1k_tokens_1_thread": variant_rows,
        "targets": {"stage_p50_ms_at_1k": 20.0, "share_of_prefill": 0.05},
        "met": {row["variant"]: {
            "p50_at_1k": row["stage_p50_ms"] <= 20.0,
            "share_of_prefill_at_1k": row["stage_p50_share_of_prefill"] < 0.05
            if "stage_p50_share_of_prefill" in row else None} for row in at_1k},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_prefill and args.only is None:  # the plot's right panel needs the prefill
        plot(report)
    elif args.only == "block":
        plot_block(report, RESULTS / f"{args.out}.png")
    print(json.dumps(report["met"]))


def plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, *_ in VARIANTS:
        rows = [r for r in report["rows"] if r["variant"] == variant]
        xs = [r["worker_prompt_tokens"] for r in rows]
        line = axes[0].plot(xs, [r["stage_p50_ms"] for r in rows], "o-", label=f"p50, {variant}")
        axes[0].plot(xs, [r["stage_p99_ms"] for r in rows], "x--", color=line[0].get_color(),
                     label=f"p99, {variant}")
    axes[0].axhline(20, color="red", lw=0.8, label="target p50 at 1K")
    axes[0].set_xlabel("prompt tokens (SmolLM2)")
    axes[0].set_ylabel("stage latency (ms)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    rows = [r for r in report["rows"] if r["variant"] == DEFAULT]
    xs = [r["worker_prompt_tokens"] for r in rows]
    axes[1].plot(xs, [r["prefill_ms"] for r in rows], "o-", label="prefill, original")
    axes[1].plot(xs, [r["prefill_annotated_ms"] for r in rows], "o-", label="prefill, annotated")
    axes[1].plot(xs, [r["stage_p50_ms"] for r in rows], "o-", label=f"stage p50 ({DEFAULT})")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("prompt tokens (SmolLM2)")
    axes[1].set_ylabel("ms")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"SecurityLingua overhead, {report['date']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "securitylingua_overhead.png", dpi=110)


def plot_block(report: dict, path: Path) -> None:
    """Block mode's stage latency per harm classifier (and the prefill, when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for variant, _ in BLOCK_VARIANTS:
        rows = [r for r in report["rows"] if r["variant"] == variant]
        if not rows:
            continue
        xs = [r["prompt_tokens"] for r in rows]
        line = axis.plot(xs, [r["stage_p50_ms"] for r in rows], "o-", label=f"p50, {variant}")
        axis.plot(xs, [r["stage_p99_ms"] for r in rows], "x--", color=line[0].get_color())
    prefill = {r["prompt_tokens"]: r["prefill_ms"] for r in report["rows"] if "prefill_ms" in r}
    if prefill:
        axis.plot(list(prefill), list(prefill.values()), "k:", label="served model's prefill")
    axis.axhline(20, color="red", lw=0.8, label="target p50 at 1K")
    axis.set_xlabel("prompt tokens (SmolLM2)")
    axis.set_ylabel("ms (x: p99)")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    axis.set_title(f"SecurityLingua block mode, stage latency, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
