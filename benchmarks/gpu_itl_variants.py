"""Decode ITL of TriangleMix servers that differ in one kernel-launch setting (GPU host).

Issue 18: after its sparse prefills, the TriangleMix server decodes ~0.2 ms a step slower
than FA3 and than tessera in dense mode. The profile of 2026-12-01 (gpu_serving_ttft.py
--profile-decode) found the same 418 kernels and the same GPU time per step, but no kernel
overlap at any boundary of the replayed decode graph (median gap 0.42 us vs 0.06 us in the
FA3 and dense servers). What a sparse prefill does that dense prefill does not: it launches
Triton and Gluon kernels, and runs the last-q rows on a high-priority side stream. Each
variant server turns one of those off (`TESSERA_ATTENTION_KERNEL_*`):

- `fa3`, `dense`: the references;
- `tri`: TriangleMix as shipped (Gluon streaming kernel, side stream);
- `tri_one_stream`: the last rows after the streaming rows on the main stream;
- `tri_triton`: the Triton streaming kernel instead of Gluon (side stream kept).

Five 8B-shape servers (dummy weights, 5 GiB of KV each: one 32K prompt) share the GPU.
Each is warmed with a 32K prompt (so the TriangleMix ones have run sparse prefills), then
ITL after a 32K prompt, servers alternating, median of 5, and a torch profile of 20 decode
steps per server reduced to boundary gaps.

    . scripts/gpu/setup.sh && python3 benchmarks/gpu_itl_variants.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_decode_profile import profile_window, profiler_args, summarize_trace  # noqa: E402
from gpu_servers import GpuServer, wait_healthy  # noqa: E402
from gpu_serving_ttft import MODEL, itl, prompt_tokens, stream  # noqa: E402

LOG_DIR = Path("/root/itl_variants")
COMMON_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "36864",
               "--block-size", "64", "--gpu-memory-utilization", "0.17",
               "--kv-cache-memory-bytes", str(5 << 30)]
TRIANGLEMIX = {"TESSERA_ATTENTION_METHOD": "trianglemix",
               "TESSERA_ATTENTION_DENSE_FIRST_LAYERS": "16"}
VARIANTS = {
    "fa3": ("FLASH_ATTN", {}),
    "dense": ("CUSTOM", {"TESSERA_ATTENTION_METHOD": "dense"}),
    "tri": ("CUSTOM", TRIANGLEMIX),
    "tri_one_stream": ("CUSTOM",
                       {**TRIANGLEMIX, "TESSERA_ATTENTION_KERNEL_OVERLAP_LAST_ROWS": "0"}),
    "tri_triton": ("CUSTOM", {**TRIANGLEMIX, "TESSERA_ATTENTION_KERNEL_STREAMING": "triton"}),
}


def make_servers(base_port: int) -> list[GpuServer]:
    servers = []
    for offset, (name, (backend, env)) in enumerate(VARIANTS.items()):
        args = [*COMMON_ARGS, "--attention-backend", backend,
                *profiler_args(LOG_DIR / "profiles" / name, skip_steps=6, steps=20)]
        servers.append(GpuServer(name, base_port + offset, args, env))
    return servers


def median_by_path(runs: list[dict]) -> dict[str, float]:
    """Median ITL (ms) per server over the runs of ``itl``."""
    names = dict.fromkeys(r["path"] for r in runs)
    return {name: statistics.median(r["itl_median_ms"] for r in runs if r["path"] == name)
            for name in names}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["itl_median_ms"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [result["itl_median_ms"][n] for n in names])
    left.set_ylim(min(result["itl_median_ms"].values()) * 0.95, None)
    left.set_ylabel("decode ITL after 32K, median of 5 (ms)")
    left.set_title("vLLM 0.26, 8B shape, H200: ITL by variant")
    gaps = [result["decode_profile"].get(n, {}).get("boundary_gap_us_median") or 0
            for n in names]
    right.bar(names, gaps)
    right.set_ylabel("median gap between graph kernels (us)")
    right.set_title("inside the replayed decode graph")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default="/root/models/llama8b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base-port", type=int, default=8500)
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON, run nothing")
    args = parser.parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    servers = make_servers(args.base_port)
    result: dict = {"benchmark": "gpu_itl_variants", "date": time.strftime("%Y-%m-%d"),
                    "server_args": COMMON_ARGS,
                    "variants": {name: env for name, (_, env) in VARIANTS.items()}}
    out_json = args.out / "gpu_itl_variants.json"
    try:
        for server in servers:
            server.start(args.model, MODEL, LOG_DIR)
        wait_healthy(servers, timeout_s=420)
        result["healthy_after_s"] = {s.name: s.healthy_after_s for s in servers}
        paths = {s.name: s.url for s in servers}
        # ITL after a 600-token prompt (dense in every variant) before any server has seen a
        # long prompt, then again after the warm-up: tells a gap that vLLM's start already
        # leaves (graph capture, module loading) from one a sparse prefill leaves behind
        print("[variants] ITL before any long prompt (600 tokens)", flush=True)
        before = itl(paths, [600], 3, None, names=tuple(paths))
        result["itl_600_before_sparse_ms"] = median_by_path(before)
        print("[variants] warm-up: one 32K prompt each", flush=True)
        for server in servers:
            stream(server.url, prompt_tokens(32768, seed=server.port), 1)
        runs = itl(paths, [32768], args.repeats, None, names=tuple(paths))
        result["itl_runs"] = runs
        result["itl_median_ms"] = median_by_path(runs)
        after = itl(paths, [600], 3, None, names=tuple(paths))
        result["itl_600_after_sparse_ms"] = median_by_path(after)
        result["itl_600_runs"] = before + after
        print("[variants] ITL 600 before / after:",
              json.dumps({n: [result["itl_600_before_sparse_ms"][n],
                              result["itl_600_after_sparse_ms"][n]] for n in paths}),
              flush=True)
        out_json.write_text(json.dumps(result, indent=1))
        result["decode_profile"] = {}
        for server in servers:
            print(f"[variants] profile {server.name}", flush=True)
            traces = profile_window(server.url, LOG_DIR / "profiles" / server.name,
                                    lambda s=server: stream(s.url, prompt_tokens(32768, 4242),
                                                            40))
            worker = [t for t in traces if "profiler_out" not in t.name]
            summary = summarize_trace(worker[0]) if worker else {"error": "no trace"}
            result["decode_profile"][server.name] = summary
            print(json.dumps({k: v for k, v in summary.items() if k != "top_kernels_per_step"}),
                  flush=True)
        print("[variants] ITL median ms:", json.dumps(result["itl_median_ms"], indent=1))
    finally:
        for server in servers:
            server.stop()
        out_json.write_text(json.dumps(result, indent=1))
        subprocess.run(["tar", "-czf", str(args.out / "itl_variants_logs.tar.gz"), "-C",
                        str(LOG_DIR.parent), LOG_DIR.name], check=False)


if __name__ == "__main__":
    main()
