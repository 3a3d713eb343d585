"""Tensor parallelism with tessera's backend on a 2-GPU host (issue 26): TP=2 vs TP=1.

Two phases, real vLLM 0.26 servers (benchmarks/gpu_servers.py), placed with tessera's own
GPU slots (server/gpu_placement.py: CUDA_VISIBLE_DEVICES, --tensor-parallel-size, NVLink
multicast off in every process):

- ``equality``: SmolLM2-135M with its real weights, padded so its heads split in two
  (server/tp_padding.py: 9/3 -> 12/6 query/KV heads, same function). Greedy tokens
  (temperature 0, 48 tokens) of TP=1 vs TP=2 for vLLM's FA3, tessera dense and tessera
  TriangleMix (SmolLM2's measured split: 24 dense layers), on short prompts and the long
  task-suite prompts (2K-7K tokens) of the SmolLM2 GPU run; controls: the unpadded model at
  TP=1 (the padding served in bf16) and each TP=1 server asked twice (run-to-run noise).
  Per-rank usage counters of every tessera server: each rank's local heads and paths.
- ``ttft``: Llama-3.1-8B shape, dummy weights. TTFT of TP1-FA3, TP1-TriangleMix,
  TP2-FA3, TP2-TriangleMix (paper split: 16 dense layers), the four alternating within each
  repeat (order reversed every other repeat), median of 5, fresh random prompts per request.
  All four are up at once: both TP=1 servers on GPU 0, the TP=2 ones on GPUs 0+1; KV budgets
  give every server the same token capacity (135,168 tokens: 16.5 GiB at TP=1, 8.25 GiB per
  rank at TP=2), so GPU 0 holds ~106 GiB (weights 15 + 15 + 7.5 + 7.5, KV 16.5 + 16.5 +
  8.25 + 8.25, ~10 activations/graphs) and GPU 1 ~37 GiB. Servers outlive a call (own
  sessions), so sizes can span two calls; ``--stop`` ends them.

    python3 benchmarks/gpu_tensor_parallel.py equality --out $OUT
    python3 benchmarks/gpu_tensor_parallel.py ttft --out $OUT --sizes 32768 65536
    python3 benchmarks/gpu_tensor_parallel.py ttft --out $OUT --sizes 130048 --stop
    python3 benchmarks/gpu_tensor_parallel.py ttft --dry-run      # this CPU: the plan only
    python3 benchmarks/gpu_tensor_parallel.py --merge A.json B.json --out benchmarks/results
    python3 benchmarks/gpu_tensor_parallel.py --plot-only RESULT.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_serving_ttft as ttft_bench  # noqa: E402
import gpu_smollm2_serving as smol_bench  # noqa: E402
import trianglemix_fidelity as fid  # noqa: E402
from gpu_servers import GpuServer, grep_log, healthy, join_calls, wait_healthy  # noqa: E402

from attention_backends.usage import read_usage, total_usage, usage_by_rank  # noqa: E402
from server.gpu_placement import GpuSlot  # noqa: E402

ROOT = Path("/root/tp_run")
SMOLLM2_SPLIT = 24  # SmolLM2's measured split (attention_backends/policy.py); the padded
# model's fingerprint (12/6 heads) is not the measured one, so it is given explicitly.
LLAMA8B_SPLIT = 16  # the paper's
TP1, TP2 = GpuSlot(("0",)), GpuSlot(("0", "1"))
TTFT_ARGS = [
    "--load-format",
    "dummy",
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "131072",
    "--block-size",
    "64",
    "--gpu-memory-utilization",
    "0.15",
]
# Same token capacity at TP=1 and TP=2 (135,168 tokens of the 8B shape: 128 KiB a token).
KV_BYTES = {1: int(16.5 * (1 << 30)), 2: int(8.25 * (1 << 30))}
TTFT_NAMES = ("tp1_fa3", "tp1_trianglemix", "tp2_fa3", "tp2_trianglemix")
EQUALITY_BACKENDS = ("fa3", "dense", "trianglemix")


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_setup(backend: str, split: int, stats: Path) -> tuple[list[str], dict[str, str]]:
    """vLLM flags and environment of one attention backend (FA3, or tessera's CUSTOM)."""
    if backend == "fa3":
        return ["--attention-backend", "FLASH_ATTN"], {}
    env = {"TESSERA_ATTENTION_STATS_DIR": str(stats)}
    if backend == "dense":
        env["TESSERA_ATTENTION_METHOD"] = "dense"
    else:
        env |= fid.trianglemix_env(split)
    return ["--attention-backend", "CUSTOM"], env


def placed(name: str, port: int, slot: GpuSlot, args: list[str], env: dict[str, str]) -> GpuServer:
    """A server on ``slot``'s GPUs: its devices, TP size and multicast-off environment (each
    server's memory share is in ``args``, so the slot adds none)."""
    return GpuServer(name, port, [*args, *slot.args(1.0, args)], env | slot.env())


def equality_servers(root: Path, base_port: int = 8500) -> list[tuple[GpuServer, str]]:
    """(server, model dir key): padded SmolLM2 at TP=1 and TP=2 per backend, plus the
    unpadded model at TP=1 with FA3."""
    servers = []
    common = smol_bench.COMMON_ARGS  # 2048-token prefill chunks, 3 GiB KV, 6% of a GPU
    for backend in EQUALITY_BACKENDS:
        for tp, slot in ((1, TP1), (2, TP2)):
            name = f"tp{tp}_{backend}"
            args, env = backend_setup(backend, SMOLLM2_SPLIT, root / "stats" / name)
            servers.append((placed(name, 0, slot, [*common, *args], env), "padded"))
    servers.append(
        (
            placed("orig_tp1_fa3", 0, TP1, [*common, "--attention-backend", "FLASH_ATTN"], {}),
            "original",
        )
    )
    for offset, (server, _) in enumerate(servers):
        server.port = base_port + offset
    return servers


def ttft_servers(root: Path, base_port: int = 8600) -> list[GpuServer]:
    servers = []
    for offset, name in enumerate(TTFT_NAMES):
        tp = int(name[2])
        backend = name.split("_", 1)[1]
        args, env = backend_setup(backend, LLAMA8B_SPLIT, root / "stats" / name)
        kv = ["--kv-cache-memory-bytes", str(KV_BYTES[tp])]
        servers.append(
            placed(name, base_port + offset, TP1 if tp == 1 else TP2, [*TTFT_ARGS, *kv, *args], env)
        )
    return servers


def rank_usage(stats: Path) -> dict:
    """Each rank's local heads and per-layer paths, and the engine's total."""
    ranks = {}
    for snapshot in read_usage(stats):
        rank = int(snapshot.get("tp_rank", 0))
        ranks.setdefault(
            rank,
            {
                "tp_world_size": snapshot.get("tp_world_size"),
                "num_heads": snapshot.get("num_heads"),
                "num_kv_heads": snapshot.get("num_kv_heads"),
                "pids": [],
            },
        )
        ranks[rank]["pids"].append(snapshot["pid"])
    for rank, per_layer in usage_by_rank(stats).items():
        ranks[rank]["layers"] = per_layer
    return {
        "ranks": {str(rank): value for rank, value in sorted(ranks.items())},
        "total": total_usage(stats),
    }


def first_difference(a: str, b: str) -> int | None:
    """Character index where two completions part, None when equal."""
    if a == b:
        return None
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def compare(texts: dict[str, list[str]], left: str, right: str) -> dict:
    pairs = list(zip(texts[left], texts[right], strict=True))
    return {
        "identical": sum(a == b for a, b in pairs),
        "prompts": len(pairs),
        "first_difference_char": [first_difference(a, b) for a, b in pairs],
    }


def run_equality(args: argparse.Namespace, result: dict) -> None:
    """Fills ``result`` as it goes: a timeout or a failure still saves what was measured."""
    from transformers import AutoTokenizer

    padded = Path(args.padded_model)
    if not (padded / "config.json").exists():
        raise SystemExit(
            f"{padded} missing: python3 -m server.tp_padding --src {args.smollm2} --dst {padded}"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    long_prompts = [
        case.prompt
        for task in args.tasks
        for length in args.lengths
        for case in smol_bench.build_cases(task, length, 1, count_tokens)
    ]
    prompts = smol_bench.EQUALITY_PROMPTS + long_prompts
    result |= {
        "phase": "equality",
        "padded_model": json.loads((padded / "config.json").read_text()).get("tessera_tp_padding"),
        "prompts": {
            "short": len(smol_bench.EQUALITY_PROMPTS),
            "long": len(long_prompts),
            "long_tokens": [count_tokens(p) for p in long_prompts],
            "sha256": [fid.prompt_sha256(p) for p in prompts],
        },
        "max_tokens": args.max_tokens,
        "trianglemix_dense_first_layers": SMOLLM2_SPLIT,
        "server_args": smol_bench.COMMON_ARGS,
    }
    servers = equality_servers(ROOT)
    models = {"padded": str(padded), "original": args.smollm2}
    shutil.rmtree(ROOT / "stats", ignore_errors=True)  # counters of this run only
    try:
        for server, model in servers:
            server.start(models[model], fid.MODEL, ROOT)
        wait_healthy([s for s, _ in servers], timeout_s=480)
        result["healthy_after_s"] = {s.name: s.healthy_after_s for s, _ in servers}
        result["backend_log_lines"] = {
            s.name: grep_log(
                s,
                "Using AttentionBackendEnum",
                "tessera attention",
                "tensor_parallel_size",
                "world_size=2",
                "NCCL",
            )
            for s, _ in servers
        }
        texts: dict[str, list[str]] = {}
        # One prompt at a time, every server in turn: no batching noise between servers.
        for prompt in prompts:
            for server, _ in servers:
                texts.setdefault(server.name, []).append(
                    smol_bench.completion(server.url, prompt, args.max_tokens)["choices"][0]["text"]
                )
        for server, _ in servers:  # run-to-run control: each TP=1 server again
            if server.name.startswith("tp1_"):
                texts[f"{server.name}_again"] = [
                    smol_bench.completion(server.url, p, args.max_tokens)["choices"][0]["text"]
                    for p in prompts
                ]
        result["completions"] = texts
        result["tp2_vs_tp1"] = {
            b: compare(texts, f"tp1_{b}", f"tp2_{b}") for b in EQUALITY_BACKENDS
        }
        result["controls"] = {
            "padded_vs_original_tp1_fa3": compare(texts, "tp1_fa3", "orig_tp1_fa3"),
            "tessera_dense_vs_fa3_tp1": compare(texts, "tp1_fa3", "tp1_dense"),
            "tessera_dense_vs_fa3_tp2": compare(texts, "tp2_fa3", "tp2_dense"),
            **{
                f"{b}_tp1_again": compare(texts, f"tp1_{b}", f"tp1_{b}_again")
                for b in EQUALITY_BACKENDS
            },
        }
        time.sleep(1)
        result["usage"] = {
            s.name: rank_usage(ROOT / "stats" / s.name) for s, _ in servers if "fa3" not in s.name
        }
    finally:
        for server, _ in servers:
            server.stop()


def run_ttft(args: argparse.Namespace, result: dict) -> None:
    """Fills ``result``; the servers outlive the call unless ``--stop``."""
    servers = ttft_servers(ROOT)
    result |= {
        "phase": "ttft",
        "sizes": args.sizes,
        "repeats": args.repeats,
        "server_args": {s.name: s.args for s in servers},
        "server_gpus": {s.name: s.env["CUDA_VISIBLE_DEVICES"] for s in servers},
        "trianglemix_dense_first_layers": LLAMA8B_SPLIT,
    }
    fresh = [s for s in servers if not healthy(s.url)]
    for server in fresh:  # a server kept from an earlier call keeps its counters
        shutil.rmtree(ROOT / "stats" / server.name, ignore_errors=True)
        server.start(args.model, ttft_bench.MODEL, ROOT)
    if fresh:
        wait_healthy(fresh, timeout_s=540)
        result["healthy_after_s"] = {s.name: s.healthy_after_s for s in fresh}
        result["backend_log_lines"] = {
            s.name: grep_log(
                s,
                "Using AttentionBackendEnum",
                "tessera attention",
                "KV cache size",
                "world_size=2",
                "FlashAttention version",
            )
            for s in fresh
        }
    print("[tp] warm-up (first long prefill: kernels compile)", flush=True)
    for server in servers:
        seed = hash(server.name) & 0xFFFF
        ttft_bench.stream(server.url, ttft_bench.prompt_tokens(32768, seed), 1)
    runs = []
    tag = "_".join(str(s) for s in args.sizes)
    for size in args.sizes:
        for repeat in range(args.repeats):
            order = servers if repeat % 2 == 0 else servers[::-1]
            for server in order:
                seed = size * 1000 + repeat * 10 + TTFT_NAMES.index(server.name)
                seconds = ttft_bench.stream(server.url, ttft_bench.prompt_tokens(size, seed), 1)[
                    "ttft_s"
                ]
                runs.append(
                    {"server": server.name, "tokens": size, "repeat": repeat, "ttft_s": seconds}
                )
                print(f"  {size:6d} r{repeat} {server.name:16s} {seconds:.3f} s", flush=True)
            result["runs"] = runs
            (args.out / f"gpu_tensor_parallel_ttft_{tag}.json").write_text(
                json.dumps(result, indent=1)
            )
    result["runs"] = runs
    result.update(ttft_summary(runs))
    result["usage"] = {
        s.name: rank_usage(ROOT / "stats" / s.name) for s in servers if "fa3" not in s.name
    }
    if args.stop:
        for server in servers:
            server.stop()


def ttft_summary(runs: list[dict]) -> dict:
    """Medians per server and size; TP=2's change vs TP=1 per backend, TriangleMix's vs FA3
    per TP size (percent)."""
    sizes = sorted({r["tokens"] for r in runs})
    medians = {
        f"{name}@{size}": statistics.median(
            r["ttft_s"] for r in runs if r["server"] == name and r["tokens"] == size
        )
        for size in sizes
        for name in TTFT_NAMES
        if any(r["server"] == name and r["tokens"] == size for r in runs)
    }

    def change(a: str, b: str, size: int) -> float | None:
        if f"{a}@{size}" not in medians or f"{b}@{size}" not in medians:
            return None
        return 100 * (medians[f"{b}@{size}"] / medians[f"{a}@{size}"] - 1)

    return {
        "ttft_median_s": medians,
        "tp2_vs_tp1_pct": {
            f"{b}@{s}": change(f"tp1_{b}", f"tp2_{b}", s)
            for b in ("fa3", "trianglemix")
            for s in sizes
        },
        "trianglemix_vs_fa3_pct": {
            f"tp{t}@{s}": change(f"tp{t}_fa3", f"tp{t}_trianglemix", s)
            for t in (1, 2)
            for s in sizes
        },
    }


def merge(parts: list[dict]) -> dict:
    """One result from a run's calls: runs joined and summarised again; usage counters are
    cumulative, so the last call's are the run's; start-up facts from the call that had them."""
    merged = join_calls(parts, concat=("runs", "sizes"), latest=("usage",))
    merged.update(ttft_summary(merged["runs"]))
    return merged


def plot(result: dict, png: Path) -> None:
    """TTFT medians per size for the four servers, and TP=2's change vs TP=1 (left, right);
    for an equality result, identical completions per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.get("phase") == "equality":
        pairs = {
            **{f"TP2 vs TP1, {b}": v for b, v in result["tp2_vs_tp1"].items()},
            **result["controls"],
        }
        fig, axis = plt.subplots(figsize=(10, 4))
        axis.barh(list(pairs), [v["identical"] / v["prompts"] for v in pairs.values()])
        axis.set_xlim(0, 1)
        prompts = next(iter(pairs.values()))["prompts"]
        axis.set_xlabel(f"identical greedy completions (of {prompts})")
        axis.set_title("SmolLM2-135M padded to 12/6 heads, real weights, vLLM 0.26, 2x H200")
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        return
    sizes = sorted({r["tokens"] for r in result["runs"]})
    medians = result["ttft_median_s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(TTFT_NAMES)
    for offset, name in enumerate(TTFT_NAMES):
        xs = [i + (offset - (len(TTFT_NAMES) - 1) / 2) * width for i in range(len(sizes))]
        left.bar(xs, [medians.get(f"{name}@{s}", 0) for s in sizes], width, label=name)
    labels = [f"{s // 1024}K" for s in sizes]
    left.set_xticks(range(len(sizes)), labels)
    left.set_ylabel(f"TTFT, median of {result.get('repeats', 5)} (s)")
    left.set_title("vLLM 0.26, Llama-3.1-8B shape (dummy weights), H200")
    left.legend(fontsize=8)
    for backend, marker in (("fa3", "o-"), ("trianglemix", "s--")):
        right.plot(
            labels,
            [result["tp2_vs_tp1_pct"][f"{backend}@{s}"] for s in sizes],
            marker,
            label=f"TP=2 vs TP=1, {backend}",
        )
    right.axhline(0, color="gray", lw=0.8)
    right.set_ylabel("TTFT change (%)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", nargs="?", choices=("equality", "ttft"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536, 130048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stop", action="store_true", help="ttft: stop the servers at the end")
    parser.add_argument("--model", default="/root/models/llama8b")
    parser.add_argument("--smollm2", default="/root/models/smollm2")
    parser.add_argument("--padded-model", default="/root/models/smollm2-tp2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7168])
    parser.add_argument(
        "--tasks", nargs="+", default=["passkey", "needle_prose", "variable_lookup", "multi_key"]
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the servers' command lines, GPUs and env; run nothing",
    )
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="ttft: merge the JSONs of one run's calls into "
        "--out/gpu_tensor_parallel_ttft.json (+ PNG)",
    )
    args = parser.parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    if args.merge:
        merged = merge([json.loads(path.read_text()) for path in args.merge])
        target = args.out / "gpu_tensor_parallel_ttft.json"
        target.write_text(json.dumps(merged, indent=1))
        plot(merged, target.with_suffix(".png"))
        return
    if args.phase is None:
        parser.error("give a phase: equality or ttft")
    if args.dry_run:
        servers = (
            [s for s, _ in equality_servers(ROOT)]
            if args.phase == "equality"
            else ttft_servers(ROOT)
        )
        print(
            json.dumps(
                [{"name": s.name, "port": s.port, "args": s.args, "env": s.env} for s in servers],
                indent=1,
            )
        )
        return
    gpus = gpu_count()
    if gpus < 2:
        raise SystemExit(
            f"gpu_tensor_parallel: needs a host with 2 GPUs, this one has {gpus}"
            " (run it on nvidia-h200-x2: scripts/gpu/README.md)"
        )
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    ROOT.mkdir(parents=True, exist_ok=True)
    # `timeout` sends SIGTERM: leave through `finally` (equality stops its servers; the
    # result so far is saved either way).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    result: dict = {
        "benchmark": "gpu_tensor_parallel",
        "date": time.strftime("%Y-%m-%d"),
        "gpus": gpus,
    }
    name = (
        "gpu_tensor_parallel_equality"
        if args.phase == "equality"
        else f"gpu_tensor_parallel_ttft_{'_'.join(str(s) for s in args.sizes)}"
    )
    target = args.out / f"{name}.json"
    try:
        (run_equality if args.phase == "equality" else run_ttft)(args, result)
    finally:
        result["wall_s"] = round(time.monotonic() - started, 1)
        target.write_text(json.dumps(result, indent=1))
        subprocess.run(
            [
                "tar",
                "-czf",
                str(args.out / f"{name}_logs.tar.gz"),
                "-C",
                str(ROOT.parent),
                ROOT.name,
            ],
            check=False,
        )
    summary = {
        k: result.get(k)
        for k in (
            "tp2_vs_tp1",
            "controls",
            "ttft_median_s",
            "tp2_vs_tp1_pct",
            "trianglemix_vs_fa3_pct",
        )
    }
    print(json.dumps({k: v for k, v in summary.items() if v is not None}, indent=1))
    if args.phase == "equality":
        for server_name, usage in result.get("usage", {}).items():
            print(
                server_name,
                {
                    rank: (value["num_heads"], value["num_kv_heads"])
                    for rank, value in usage["ranks"].items()
                },
            )


if __name__ == "__main__":
    main()
