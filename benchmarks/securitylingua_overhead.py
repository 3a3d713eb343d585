"""SecurityLingua's cost on the request path, at prompts of ~100 / 1K / 4K served-model tokens.

1. Stage latency (what the gateway spends in the stage, asyncio hop included): N calls per
   length after a warm-up, p50 / p99: fp32 at 1 torch thread (the default), int8 at 1
   thread, fp32 at 2 threads.
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
from prompt_pipeline.securitylingua import sources  # noqa: E402
from prompt_pipeline.securitylingua.stage import build_securitylingua_stage  # noqa: E402
from prompt_pipeline.securitylingua.templates import dan_templates  # noqa: E402
from prompt_pipeline.stage import RequestContext  # noqa: E402
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
VARIANTS = (("fp32, 1 thread", 1, "none"), ("int8, 1 thread", 1, "int8"),
            ("fp32, 2 threads", 2, "none"))
FILLER = ("The committee met on Tuesday to review the quarterly figures. Attendance was good "
          "and the minutes were approved without changes. ")


def prompt_of(tokens: int, counter: Tokenizer) -> str:
    """A jailbreak-shaped prompt of about `tokens` SmolLM2 tokens: background text, a DAN
    preamble when it fits, then a HarmBench request at the end."""
    request = sources.harmbench()[3]
    preamble = dan_templates()[0].replace("{instruction}", request)
    text = preamble if len(counter.encode(preamble).ids) < tokens else request
    while len(counter.encode(text).ids) < tokens:
        text = FILLER + text
    return text


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


async def stage_latency(stage, request, runs: int) -> list[float]:
    for _ in range(5):
        await stage(request, RequestContext("warm", "chat"))
    samples = []
    for index in range(runs):
        started = time.perf_counter()
        await stage(request, RequestContext(str(index), "chat"))
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


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
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--variants", nargs="*", default=[],
                        help="also time compress() at 1K tokens for NAME=ARTIFACT_DIR[:int8]")
    args = parser.parse_args()
    # Prefix caching off: repeated prompts would otherwise be cache hits, not prefills (our
    # first run measured 0.07 s for 1K tokens that way).
    settings = ServerSettings(workers=1, worker_extra_args=["--no-enable-prefix-caching"])
    model_path = resolve_model_path(settings)
    counter = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    rows = []
    for variant, threads, quantize in VARIANTS:
        stage = build_securitylingua_stage(
            SecurityLinguaSettings(threads=threads, quantize=quantize), CollectorRegistry(), None)
        for length in LENGTHS:
            text = prompt_of(length, counter)
            request = ChatCompletionRequest.model_validate(
                {"model": MODEL, "messages": [{"role": "user", "content": text}]})
            samples = asyncio.run(stage_latency(stage, request, args.runs))
            annotated = asyncio.run(stage(request, RequestContext("x", "chat")))
            rows.append({"variant": variant, "threads": threads, "quantize": quantize,
                         "target_tokens": length,
                         "prompt_tokens": len(counter.encode(text).ids),
                         "stage_p50_ms": round(percentile(samples, 50), 2),
                         "stage_p99_ms": round(percentile(samples, 99), 2),
                         "intention_words": len(annotated.messages[0].content.split()),
                         "_original": messages_body(request),
                         "_annotated": messages_body(annotated)})
            print(variant, length, rows[-1]["stage_p50_ms"], rows[-1]["stage_p99_ms"],
                  flush=True)

    variant_rows = time_variants(args.variants, prompt_of(1000, counter), args.runs // 4)
    worker = start_worker(settings, model_path, 0, port=free_port())
    try:
        wait_until_healthy([worker], timeout_s=600)
        with httpx.Client(timeout=600) as client:
            prefill_cache: dict[int, tuple[float, float, int, int]] = {}
            for row in rows:
                key = row["target_tokens"]
                if key not in prefill_cache:
                    original, annotated = row["_original"], row["_annotated"]
                    prefill_ms(client, worker.url, original, repeats=1)  # warm-up
                    prefill_cache[key] = (
                        prefill_ms(client, worker.url, original),
                        prefill_ms(client, worker.url, annotated),
                        worker_tokens(client, worker.url, original),
                        worker_tokens(client, worker.url, annotated))
                plain, annotated_ms, plain_tokens, annotated_tokens = prefill_cache[key]
                row.update({
                    "worker_prompt_tokens": plain_tokens,
                    "tokens_added": annotated_tokens - plain_tokens,
                    "prefill_ms": round(plain, 1), "prefill_annotated_ms": round(annotated_ms, 1),
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
        "runs_per_cell": args.runs, "rows": rows,
        "extractor_variants_at_1k_tokens_1_thread": variant_rows,
        "targets": {"stage_p50_ms_at_1k": 20.0, "share_of_prefill": 0.05},
        "met": {row["variant"]: {
            "p50_at_1k": row["stage_p50_ms"] <= 20.0,
            "share_of_prefill_at_1k": row["stage_p50_share_of_prefill"] < 0.05} for row in at_1k},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "securitylingua_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report)
    print(json.dumps(report["met"]))


def plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, _, _ in VARIANTS:
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
    rows = [r for r in report["rows"] if r["variant"] == VARIANTS[0][0]]
    xs = [r["worker_prompt_tokens"] for r in rows]
    axes[1].plot(xs, [r["prefill_ms"] for r in rows], "o-", label="prefill, original")
    axes[1].plot(xs, [r["prefill_annotated_ms"] for r in rows], "o-", label="prefill, annotated")
    axes[1].plot(xs, [r["stage_p50_ms"] for r in rows], "o-", label=f"stage p50 ({VARIANTS[0][0]})")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("prompt tokens (SmolLM2)")
    axes[1].set_ylabel("ms")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"SecurityLingua overhead, {report['date']}")
    fig.tight_layout()
    fig.savefig(RESULTS / "securitylingua_overhead.png", dpi=110)


if __name__ == "__main__":
    main()
