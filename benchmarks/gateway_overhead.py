"""Gateway overhead: the same requests sent straight to a vLLM worker and through the gateway.

One run starts one real worker (SmolLM2, CPU) and a gateway over it, then:
1. latency: `--rounds` rounds of N sequential completion requests (max_tokens=1), alternating
   direct / gateway so drift hits both alike; added latency = per-pair difference, p50/p99
   per round, median over rounds (also: p99 through the gateway minus p99 direct);
2. throughput: closed-loop load at several concurrencies for a fixed time against each
   target; max req/s of each and their ratio.
With `--pin` the worker's OpenMP threads run on core 0 and the gateway on core 1 (taskset),
so the worker's spinning threads do not preempt the gateway; without it both float.
Writes benchmarks/results/<output>.json and .png.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/gateway_overhead.py \
        [--requests 200] [--rounds 5] [--seconds 10] [--pin] [--gateway-src CHECKOUT]
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



def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


async def measure_latency(direct: str, gateway: str, count: int, rounds: int) -> dict:
    per_round = [await measure_latency_round(direct, gateway, count) for _ in range(rounds)]

    def median_of(*keys: str) -> float:
        values = []
        for row in per_round:
            for key in keys:
                row = row[key]
            values.append(row)
        return statistics.median(values)

    return {
        "rounds": rounds, "requests_per_target_per_round": count,
        "added_ms": {"p50": median_of("added_ms", "p50"), "p99": median_of("added_ms", "p99"),
                     "mean": median_of("added_ms", "mean"),
                     "p99_gateway_minus_p99_direct": median_of("added_ms", "p99_difference")},
        "direct_ms": {"p50": median_of("direct_ms", "p50"), "p99": median_of("direct_ms", "p99")},
        "gateway_ms": {"p50": median_of("gateway_ms", "p50"),
                       "p99": median_of("gateway_ms", "p99")},
        "per_round": per_round,
    }


async def measure_latency_round(direct: str, gateway: str, count: int) -> dict:
    direct_ms, gateway_ms = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for url in (direct, gateway):  # warm both paths (connections, first-request costs)
            for _ in range(10):
                (await client.post(f"{url}/v1/completions", json=BODY)).raise_for_status()
        for index in range(count):
            order = (direct, gateway) if index % 2 == 0 else (gateway, direct)
            for url in order:
                started = time.perf_counter()
                (await client.post(f"{url}/v1/completions", json=BODY)).raise_for_status()
                elapsed = (time.perf_counter() - started) * 1e3
                (direct_ms if url == direct else gateway_ms).append(elapsed)
            if (index + 1) % 50 == 0:
                print(f"  latency pairs {index + 1}/{count}", file=sys.stderr)
    added = [g - d for g, d in zip(gateway_ms, direct_ms, strict=True)]
    return {
        "requests_per_target": count,
        "direct_ms": {"p50": percentile(direct_ms, 50), "p99": percentile(direct_ms, 99)},
        "gateway_ms": {"p50": percentile(gateway_ms, 50), "p99": percentile(gateway_ms, 99)},
        "added_ms": {"p50": statistics.median(added), "p99": percentile(added, 99),
                     "mean": statistics.fmean(added),
                     "p99_difference": percentile(gateway_ms, 99) - percentile(direct_ms, 99)},
        "raw": {"direct_ms": direct_ms, "gateway_ms": gateway_ms},
    }


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

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, key in (("direct to worker", "direct_ms"), ("through gateway", "gateway_ms")):
        values = sorted(v for row in result["latency"]["per_round"] for v in row["raw"][key])
        left.plot(values, [i / len(values) for i in range(len(values))], label=name)
    added = result["latency"]["added_ms"]
    left.set(xlabel="request latency (ms), max_tokens=1", ylabel="CDF",
             title=f"added p50 {added['p50']:.2f} ms, p99 {added['p99']:.2f} ms")
    left.legend()
    rows = result["throughput"]
    concurrencies = [row["concurrency"] for row in rows]
    width = 0.38
    positions = range(len(rows))
    right.bar([p - width / 2 for p in positions], [row["direct_rps"] for row in rows], width,
              label="direct")
    right.bar([p + width / 2 for p in positions], [row["gateway_rps"] for row in rows], width,
              label="gateway")
    right.set_xticks(list(positions), [str(c) for c in concurrencies])
    right.set(xlabel="concurrent clients", ylabel="completed req/s",
              title="closed-loop throughput (2-core CPU, worker shares cores)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--pin", action="store_true",
                        help="worker on core 0, gateway on core 1 (taskset)")
    parser.add_argument("--gateway-src", type=Path, default=ROOT,
                        help="checkout whose server/ runs as the gateway (default: this one)")
    parser.add_argument("--output", default="gateway_overhead")
    args = parser.parse_args()

    load_before = os.getloadavg()
    settings = ServerSettings(workers=1, kv_cache_space_gib=1, max_model_len=2048)
    model_path = resolve_model_path(settings)
    pin_env = {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    worker = start_worker(settings, model_path, 0, port=free_port(),
                          extra_env=pin_env if args.pin else None)
    gateway_port = free_port()
    gateway = None
    try:
        wait_until_healthy([worker], timeout_s=600)
        pin = ["taskset", "-c", "1"] if args.pin else []
        gateway = subprocess.Popen(
            [*pin, sys.executable, "-m", "server.cli", "gateway", "--port", str(gateway_port),
             "--worker-url", worker.url, "--log-level", "warning"],
            cwd=args.gateway_src, env=os.environ | {"PYTHONPATH": str(args.gateway_src)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_for_health(gateway_url, gateway, timeout_s=20)
        print("measuring latency...", file=sys.stderr)
        latency = asyncio.run(measure_latency(worker.url, gateway_url, args.requests,
                                              args.rounds))
        throughput = []
        for concurrency in args.concurrency:
            print(f"measuring throughput at concurrency {concurrency}...", file=sys.stderr)
            direct_rps = asyncio.run(measure_throughput(worker.url, concurrency, args.seconds))
            gateway_rps = asyncio.run(measure_throughput(gateway_url, concurrency, args.seconds))
            throughput.append({"concurrency": concurrency, "direct_rps": direct_rps,
                               "gateway_rps": gateway_rps,
                               "gateway_over_direct": gateway_rps / direct_rps})
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=15)
        stop_workers([worker])

    result = {
        "benchmark": "gateway_overhead",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv), "gateway_src": str(args.gateway_src),
        "pinned": args.pin,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "request": BODY,
        "target_added_ms": {"p50": 2.0, "p99": 10.0},
        "latency": latency,
        "throughput": throughput,
        "max_rps": {"direct": max(row["direct_rps"] for row in throughput),
                    "gateway": max(row["gateway_rps"] for row in throughput)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{args.output}.png")
    added = latency["added_ms"]
    print(f"added latency p50 {added['p50']:.2f} ms, p99 {added['p99']:.2f} ms; "
          f"max req/s direct {result['max_rps']['direct']:.0f}, "
          f"gateway {result['max_rps']['gateway']:.0f}")


if __name__ == "__main__":
    main()
