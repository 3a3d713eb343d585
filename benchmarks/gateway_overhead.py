"""Gateway overhead: the same requests sent straight to a vLLM worker and through the gateway.

One run starts one real worker (SmolLM2, CPU) and a gateway over it (and, with
`--baseline-src`, a second gateway from another checkout over the same worker), then:
1. latency: `--rounds` rounds of N sequential completion requests (max_tokens=1); each
   request index visits every target, in an order that rotates so drift hits all alike;
   added latency = per-index difference gateway - direct, p50/p99 per round, median over
   rounds (also reported: p99 through the gateway minus p99 direct);
2. throughput: closed-loop load at several concurrencies for a fixed time per target.
With `--pin` the worker's OpenMP threads run on core 0 and the gateways on core 1
(taskset), so the worker's spinning threads do not preempt the gateway; the client floats.
Writes benchmarks/results/<output>.json and .png.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/gateway_overhead.py \\
        [--requests 200] [--rounds 5] [--seconds 10] [--pin] [--baseline-src CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.config import ServerSettings  # noqa: E402
from server.launcher import (  # noqa: E402
    free_port,
    resolve_model_path,
    start_worker,
    stop_workers,
    wait_for_health,
    wait_until_healthy,
)

RESULTS = Path(__file__).resolve().parent / "results"
BODY = {"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 1, "temperature": 0}
TARGET_ADDED_MS = {"p50": 2.0, "p99": 10.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


async def latency_round(targets: dict[str, str], count: int) -> dict[str, list[float]]:
    """Milliseconds per request, per target, index-aligned across targets."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    async with httpx.AsyncClient(timeout=60) as client:
        for url in targets.values():  # warm every path (connections, first-request costs)
            for _ in range(10):
                (await client.post(f"{url}/v1/completions", json=BODY)).raise_for_status()
        for index in range(count):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                response = await client.post(f"{targets[name]}/v1/completions", json=BODY)
                response.raise_for_status()
                samples[name].append((time.perf_counter() - started) * 1e3)
    return samples


def added(samples: dict[str, list[float]], gateway: str) -> dict:
    direct, through = samples["direct"], samples[gateway]
    diffs = [g - d for g, d in zip(through, direct, strict=True)]
    return {"p50": statistics.median(diffs), "p99": percentile(diffs, 99),
            "mean": statistics.fmean(diffs),
            "p99_gateway_minus_p99_direct": percentile(through, 99) - percentile(direct, 99),
            "p50_gateway_minus_p50_direct": percentile(through, 50) - percentile(direct, 50)}


async def measure_latency(targets: dict[str, str], count: int, rounds: int) -> dict:
    per_round = []
    for index in range(rounds):
        samples = await latency_round(targets, count)
        row = {"samples_ms": samples,
               "p50_ms": {name: percentile(values, 50) for name, values in samples.items()},
               "p99_ms": {name: percentile(values, 99) for name, values in samples.items()},
               "added_ms": {name: added(samples, name) for name in targets if name != "direct"}}
        per_round.append(row)
        summary = ", ".join(f"{name} +{row['added_ms'][name]['p50']:.2f}/"
                            f"+{row['added_ms'][name]['p99']:.2f} ms"
                            for name in row["added_ms"])
        print(f"  round {index + 1}/{rounds}: added p50/p99 {summary}", file=sys.stderr)
    medians = {
        name: {key: statistics.median(row["added_ms"][name][key] for row in per_round)
               for key in per_round[0]["added_ms"][name]}
        for name in per_round[0]["added_ms"]
    }
    return {"rounds": rounds, "requests_per_target_per_round": count,
            "added_ms_median_of_rounds": medians, "per_round": per_round}


async def measure_throughput(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                (await client.post(f"{url}/v1/completions", json=BODY)).raise_for_status()
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    latency = result["latency"]
    for name in latency["per_round"][0]["samples_ms"]:
        values = sorted(v for row in latency["per_round"] for v in row["samples_ms"][name])
        left.plot(values, [i / len(values) for i in range(len(values))], label=name)
    added_now = latency["added_ms_median_of_rounds"]["gateway"]
    left.set(xlabel="request latency (ms), max_tokens=1", ylabel="CDF",
             title=f"gateway added p50 {added_now['p50']:.2f} ms, p99 {added_now['p99']:.2f} ms",
             xlim=(0, percentile([v for row in latency["per_round"]
                                  for v in row["samples_ms"]["direct"]], 99.5) * 1.5))
    left.legend()
    rows = result["throughput"]
    names = list(rows[0]["rps"])
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        right.bar([i + (offset - (len(names) - 1) / 2) * width for i in range(len(rows))],
                  [row["rps"][name] for row in rows], width, label=name)
    right.set_xticks(range(len(rows)), [str(row["concurrency"]) for row in rows])
    right.set(xlabel="concurrent clients", ylabel="completed req/s",
              title="closed-loop throughput, one SmolLM2 CPU worker")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def start_gateway(src: Path, port: int, worker_url: str, pin: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*pin, sys.executable, "-m", "server.cli", "gateway", "--port", str(port),
         "--worker-url", worker_url, "--log-level", "warning"],
        cwd=src, env=os.environ | {"PYTHONPATH": str(src)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--pin", action="store_true",
                        help="worker on core 0, gateways on core 1 (taskset)")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="also measure the gateway of this checkout (e.g. main)")
    parser.add_argument("--output", default="gateway_overhead")
    args = parser.parse_args()

    load_before = os.getloadavg()
    settings = ServerSettings(workers=1, kv_cache_space_gib=1, max_model_len=2048)
    model_path = resolve_model_path(settings)
    pin_env = {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    worker = start_worker(settings, model_path, 0, port=free_port(),
                          extra_env=pin_env if args.pin else None)
    pin = ["taskset", "-c", "1"] if args.pin else []
    gateways: list[subprocess.Popen] = []
    try:
        wait_until_healthy([worker], timeout_s=600)
        targets = {"direct": worker.url}
        sources = {"gateway": ROOT} | ({"baseline": args.baseline_src}
                                      if args.baseline_src else {})
        for name, src in sources.items():
            port = free_port()
            gateways.append(start_gateway(src, port, worker.url, pin))
            targets[name] = f"http://127.0.0.1:{port}"
            wait_for_health(targets[name], gateways[-1], timeout_s=30)
        print("measuring latency...", file=sys.stderr)
        latency = asyncio.run(measure_latency(targets, args.requests, args.rounds))
        throughput = []
        for concurrency in args.concurrency:
            print(f"measuring throughput at concurrency {concurrency}...", file=sys.stderr)
            rps = {name: asyncio.run(measure_throughput(url, concurrency, args.seconds))
                   for name, url in targets.items()}
            throughput.append({"concurrency": concurrency, "rps": rps})
    finally:
        for gateway in gateways:
            gateway.terminate()
            gateway.wait(timeout=15)
        stop_workers([worker])

    result = {
        "benchmark": "gateway_overhead",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
        "gateway_src": str(ROOT), "baseline_src": str(args.baseline_src),
        "pinned": args.pin,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "request": BODY,
        "target_added_ms": TARGET_ADDED_MS,
        "latency": latency,
        "throughput": throughput,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{args.output}.png")
    for name, row in latency["added_ms_median_of_rounds"].items():
        print(f"{name}: added latency p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms "
              f"(p99 - p99 {row['p99_gateway_minus_p99_direct']:.2f} ms)")
    for row in throughput:
        print(f"concurrency {row['concurrency']}: " + ", ".join(
            f"{name} {value:.0f} req/s" for name, value in row["rps"].items()))


if __name__ == "__main__":
    main()
