"""Data parallel behind the gateway: one vLLM worker vs two, under a concurrent long-prompt load.

Issue 26. Each phase starts its workers with tessera's own launcher code
(`server.launcher.place_workers` + `start_worker`: CUDA_VISIBLE_DEVICES per worker, NVLink
multicast off, and on a one-GPU host the two workers share the GPU at half the memory each),
then a gateway (`tessera gateway`) over them, then C clients that each send R streamed
completions of P random prompt tokens (distinct per request: no prefix-cache reuse) and
D decode tokens. Per phase: requests/s over the load's wall time, TTFT p50/p95, end-to-end
p50, requests per worker (from the workers' own vLLM counters).

    # GPU host, after `. scripts/gpu/setup.sh` (8B shape, dummy weights):
    python3 benchmarks/gpu_data_parallel.py --out $OUT
    # this CPU machine, a harness check only (SmolLM2, tiny load; the numbers mean nothing):
    .venv/bin/python benchmarks/gpu_data_parallel.py --cpu-smoke --out /tmp/dp
    # where matplotlib is:
    .venv/bin/python benchmarks/gpu_data_parallel.py --plot-only RESULT.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefix_affinity import vllm_counters  # noqa: E402

from server.config import ServerSettings  # noqa: E402
from server.launcher import (  # noqa: E402
    free_port,
    place_workers,
    resolve_model_path,
    start_workers,
    stop_workers,
    wait_for_health,
)

SERVED = "tessera-dp"


def settings_for(args: argparse.Namespace, workers: int, data_dir: Path) -> ServerSettings:
    if args.cpu_smoke:
        return ServerSettings(workers=workers, kv_cache_space_gib=1, max_model_len=2048,
                              served_model_name=SERVED, data_dir=data_dir)
    extra = ["--load-format", "dummy", "--block-size", "64",
             "--max-num-batched-tokens", "8192", *args.worker_arg]
    return ServerSettings(workers=workers, dtype="bfloat16", enforce_eager=False,
                          model_path=Path(args.model), max_model_len=args.prompt_tokens + 1024,
                          served_model_name=SERVED, data_dir=data_dir,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          worker_extra_args=extra)


def random_prompt(tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(tokens)]


async def one_request(client: httpx.AsyncClient, gateway: str, prompt: list[int],
                      max_tokens: int) -> dict:
    body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    first = None
    async with client.stream("POST", f"{gateway}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                if json.loads(line[5:]).get("choices"):
                    first = first or time.perf_counter()
    if first is None:
        raise RuntimeError("no token streamed")
    return {"ttft_s": first - started, "e2e_s": time.perf_counter() - started}


async def load(gateway: str, args: argparse.Namespace, phase_seed: int) -> tuple[list, float]:
    rows: list[dict] = []

    async def client_loop(client_index: int, client: httpx.AsyncClient) -> None:
        for repeat in range(args.requests_per_client):
            seed = phase_seed * 100_000 + client_index * 1_000 + repeat
            rows.append(await one_request(client, gateway, random_prompt(args.prompt_tokens, seed),
                                          args.max_tokens))

    limits = httpx.Limits(max_connections=args.clients + 4)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        await asyncio.gather(*(client_loop(index, client) for index in range(args.clients)))
    return rows, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def run_phase(args: argparse.Namespace, workers: int, out: Path) -> dict:
    settings, slots = place_workers(settings_for(args, workers, out / f"phase{workers}"))
    model_path = resolve_model_path(settings)
    # Workers sharing the GPU start one after another (launcher.start_waves says why).
    started = start_workers(settings, model_path, slots, timeout_s=900,
                            ports=[free_port() for _ in range(settings.workers)])
    gateway = None
    try:
        urls = [worker.url for worker in started]
        port = free_port()
        command = [sys.executable, "-m", "server.cli", "gateway", "--port", str(port),
                   "--log-level", "warning", "--served-model-name", SERVED,
                   "--routing", "least_outstanding"]
        for url in urls:
            command += ["--worker-url", url]
        gateway = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gateway_url = f"http://127.0.0.1:{port}"
        wait_for_health(gateway_url, gateway, timeout_s=60)
        # Warm-up: one request per worker (graph capture, allocator), not timed.
        asyncio.run(warm_up(gateway_url, args, len(urls)))
        before = [vllm_counters(url)["requests"] for url in urls]
        rows, wall = asyncio.run(load(gateway_url, args, phase_seed=workers))
        after = [vllm_counters(url)["requests"] for url in urls]
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=15)
        stop_workers(started)
    ttfts = [row["ttft_s"] for row in rows]
    return {
        "workers": len(started),
        "gpus": [list(slot.devices) for slot in slots] if slots else None,
        "gpu_memory_share": [slot.sharing for slot in slots] if slots else None,
        "requests": len(rows), "wall_s": wall, "requests_per_s": len(rows) / wall,
        "ttft_s": {"p50": statistics.median(ttfts), "p95": percentile(ttfts, 0.95),
                   "mean": statistics.fmean(ttfts)},
        "e2e_s_p50": statistics.median(row["e2e_s"] for row in rows),
        "requests_per_worker": [a - b for a, b in zip(after, before, strict=True)],
        "raw": rows,
    }


async def warm_up(gateway: str, args: argparse.Namespace, count: int) -> None:
    async with httpx.AsyncClient(timeout=1800) as client:
        await asyncio.gather(*(one_request(client, gateway, random_prompt(256, 9_000 + index), 4)
                               for index in range(2 * count)))


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = result["phases"]
    labels = [f"{p['workers']} worker(s)" for p in phases]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [p["requests_per_s"] for p in phases])
    left.set_ylabel("requests/s")
    width = 0.35
    xs = range(len(phases))
    right.bar([x - width / 2 for x in xs], [p["ttft_s"]["p50"] for p in phases], width,
              label="TTFT p50")
    right.bar([x + width / 2 for x in xs], [p["ttft_s"]["p95"] for p in phases], width,
              label="TTFT p95")
    right.set_xticks(list(xs), labels)
    right.set_ylabel("seconds")
    right.legend()
    load_text = (f"{result['load']['clients']} clients x {result['load']['requests_per_client']}"
                 f" requests, {result['load']['prompt_tokens']} prompt tokens")
    fig.suptitle(f"gateway over vLLM workers ({result['device']}): {load_text}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot-only", type=Path)
    parser.add_argument("--model", default="/root/models/llama8b")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=16384)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra vLLM argument for every worker (repeat), e.g. "
                             "--worker-arg=--attention-backend --worker-arg=FLASH_ATTN")
    parser.add_argument("--phases", type=int, nargs="+", default=[1, 2],
                        help="worker counts to run, in order")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="SmolLM2 on CPU workers with a tiny load: checks the harness")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    if args.out is None:
        parser.error("--out is required")
    if args.cpu_smoke:
        args.clients, args.requests_per_client = 2, 1
        args.prompt_tokens, args.max_tokens = 256, 4
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "gpu_data_parallel", "date": time.strftime("%Y-%m-%d"),
              "device": "cpu (harness check)" if args.cpu_smoke else _device_name(),
              "load": {"clients": args.clients, "requests_per_client": args.requests_per_client,
                       "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens},
              "phases": []}
    out_json = args.out / "gpu_data_parallel.json"
    for workers in args.phases:
        print(f"[dp] phase: {workers} worker(s)", flush=True)
        phase = run_phase(args, workers, args.out)
        result["phases"].append(phase)
        out_json.write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in phase.items() if k != "raw"}), flush=True)
    try:
        plot(result, out_json.with_suffix(".png"))
    except ImportError:
        pass


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


if __name__ == "__main__":
    main()
