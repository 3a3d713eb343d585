"""LeanK decode kernel vs dense decode attention over the same KV (GPU timing harness).

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), one layer, fp16,
paged with block 16; a random aligned mask at ``--sparsity`` (align 16, per-head budgets
drawn so some heads are fully pruned, as a trained mask has). Dense baseline: torch SDPA
(flash / cuDNN picks itself) over contiguous K/V of the same tokens with GQA expanded by
``enable_gqa``. Reports time, bytes each side must read, effective TB/s and the speedup;
JSON + PNG in benchmarks/results/. ``--smoke`` runs tiny shapes on CPU under
TRITON_INTERPRET=1 (checks the harness and correctness only; the times mean nothing).

Each row times eager calls (the issue's measure: host launch cost included) and, on the
GPU, the same calls replayed from CUDA graphs (how vLLM runs decode; no host cost on either
side). ``--sweep`` also times the kernel's launch configs (tile, stages, warps, tokens per
split) against the same dense baseline, graphed, each checked against the reference first.

    .venv/bin/python benchmarks/leank_decode_kernel.py --sweep    # on the H200
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/leank_decode_kernel.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_manager.leank.budget import aligned_head_budgets, topk_keep  # noqa: E402
from kv_manager.leank.kernels.decode_ref import paged_pruned_decode_ref  # noqa: E402
from kv_manager.leank.kernels.decode_triton import (  # noqa: E402
    default_tokens_per_split,
    paged_pruned_decode,
)
from kv_manager.leank.layout import LayerLayout  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def random_keep(kv_heads: int, head_dim: int, sparsity: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    importance = torch.rand(1, kv_heads, head_dim, generator=generator) ** 4
    importance *= torch.rand(1, kv_heads, 1, generator=generator) ** 2  # uneven heads
    return topk_keep(importance, aligned_head_budgets(importance, sparsity, 16))[0]


def build(
    batch: int,
    context: int,
    layout: LayerLayout,
    q_heads: int,
    block_size: int,
    device: str,
    dtype: torch.dtype,
):
    kv_heads, head_dim = layout.num_kv_heads, layout.head_dim
    blocks = batch * (context // block_size)
    k_cache = torch.randn(blocks, block_size, max(layout.k_width, 1), device=device, dtype=dtype)
    v_cache = torch.randn(
        blocks, block_size, max(len(layout.live_heads), 1), head_dim, device=device, dtype=dtype
    )
    value_sum = torch.randn(batch, len(layout.pruned_heads), head_dim, device=device)
    block_table = torch.randperm(blocks, device=device, dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, q_heads, head_dim, device=device, dtype=dtype)
    dense_k = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype)
    dense_v = torch.randn_like(dense_k)
    return (query, k_cache, v_cache, value_sum, block_table, seq_lens), (dense_k, dense_v)


def timed_many(fns: list, repeats: int, inner: int = 10) -> list[float]:
    """Median seconds per call of each of ``fns`` over ``repeats`` rounds; each round runs
    every fn (the order rotates from round to round) and times ``inner`` back-to-back calls
    with CUDA events (perf_counter on CPU), after one warm-up call each."""
    cuda = torch.cuda.is_available()
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for round_index in range(repeats):
        for step in range(len(fns)):
            which = (round_index + step) % len(fns)
            fn = fns[which]
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[which].append(start.elapsed_time(end) / 1e3 / inner)
            else:
                started = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[which].append((time.perf_counter() - started) / inner)
    return [statistics.median(s) for s in samples]


def graphed(fn):
    """``fn`` captured once in a CUDA graph; returns the replay (no host work per call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles and allocates outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# Launch configs --sweep times (each also covered by the GPU unit test's configs).
SWEEP = [
    {"block_n": 64, "num_stages": 3},
    {"block_n": 64, "num_stages": 4},
    {"block_n": 32, "num_stages": 4},
    {"block_n": 128, "num_stages": 3},
    {"block_n": 64, "num_stages": 3, "num_warps": 8},
    {"block_n": 64, "num_stages": 3, "tokens_per_split": 512},
    {"block_n": 64, "num_stages": 3, "tokens_per_split": 1024},
    {"block_n": 64, "num_stages": 3, "tokens_per_split": 4096},
    {"block_n": 64, "num_stages": 3, "tokens_per_split": 16384},
]


def worst_row_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest per-(sequence, head) relative error: max |got - expected| / max |expected|."""
    diff = (got.float() - expected.float()).abs().amax(dim=-1)
    scale = expected.float().abs().amax(dim=-1).clamp_min(1e-6)
    return float((diff / scale).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="alternating rounds (10 calls each); the median is reported",
    )
    parser.add_argument("--sweep", action="store_true", help="also time SWEEP's configs")
    parser.add_argument("--shapes", help="only these batch x context shapes, e.g. 1x32768,8x131072")
    args = parser.parse_args()
    smoke = args.smoke
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    q_heads, kv_heads, head_dim, block_size = (8, 2, 64, 16) if smoke else (32, 8, 128, 16)
    grid = [(1, 256), (2, 512)] if smoke else [(b, c) for c in (32768, 131072) for b in (1, 8, 32)]
    if args.shapes:
        grid = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    layout = LayerLayout(random_keep(kv_heads, head_dim, args.sparsity, seed=0))
    dtype_bytes = torch.finfo(dtype).bits // 8
    rows = []
    for batch, context in grid:
        paged, (dense_k, dense_v) = build(
            batch, context, layout, q_heads, block_size, device, dtype
        )
        check = paged_pruned_decode(*paged, layout)
        row_error = None
        if smoke or batch * context <= 8 * 32768:  # the fp32 reference is slow past that
            row_error = worst_row_error(check, paged_pruned_decode_ref(*paged, layout))
            assert row_error < (1e-4 if smoke else 2e-2), f"kernel vs ref: {row_error}"
        dense = partial(
            torch.nn.functional.scaled_dot_product_attention,
            paged[0].unsqueeze(2),
            dense_k,
            dense_v,
            enable_gqa=True,
        )
        ours = partial(paged_pruned_decode, *paged, layout)
        dense_s, ours_s = timed_many([dense, ours], args.repeats)
        sizes = layout.bytes_per_token(dtype_bytes)
        dense_bytes = batch * context * (sizes["k_dense"] + sizes["v_dense"])
        ours_bytes = batch * context * (sizes["k_stored"] + sizes["v_stored"])
        tokens = default_tokens_per_split(
            batch, kv_heads, paged[4].shape[1] * block_size, 64, torch.device(device)
        )
        row = {
            "batch": batch,
            "context": context,
            "default_tokens_per_split": tokens,
            "dense_ms": dense_s * 1e3,
            "leank_ms": ours_s * 1e3,
            "speedup": dense_s / ours_s,
            "worst_row_rel_error_vs_ref": row_error,
            "dense_tb_s": dense_bytes / dense_s / 1e12,
            "leank_tb_s": ours_bytes / ours_s / 1e12,
            "byte_ideal_speedup": dense_bytes / ours_bytes,
        }
        if not smoke:
            try:
                dense_graph = graphed(dense)
                dense_g, ours_g = timed_many([dense_graph, graphed(ours)], args.repeats)
            except RuntimeError as error:  # keep the eager row if capture fails
                row["graph_error"] = str(error)[:500]
            else:
                row |= {
                    "graph_dense_ms": dense_g * 1e3,
                    "graph_leank_ms": ours_g * 1e3,
                    "graph_speedup": dense_g / ours_g,
                    "graph_dense_tb_s": dense_bytes / dense_g / 1e12,
                    "graph_leank_tb_s": ours_bytes / ours_g / 1e12,
                }
                if args.sweep:
                    row["sweep"] = sweep(
                        paged, layout, check, dense_graph, ours_bytes, args.repeats
                    )
        rows.append(row)
        print(json.dumps(row), flush=True)
        del paged, dense_k, dense_v, dense, ours
    result = {
        "script": "benchmarks/leank_decode_kernel.py",
        "date": time.strftime("%Y-%m-%d"),
        "timing": f"median of {args.repeats} alternating rounds of 10 calls",
        "commit": git_commit(),
        "smoke": smoke,
        "device": torch.cuda.get_device_name() if not smoke else "cpu",
        "k_sparsity": 1 - layout.k_width / (kv_heads * head_dim),
        "pruned_heads": layout.pruned_heads,
        "rows": rows,
    }
    name = "leank_decode_kernel_smoke" if smoke else "leank_decode_kernel"
    if args.shapes:
        name += "_shapes"  # a partial rerun does not replace the full grid's file
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    if not smoke:
        plot(result, RESULTS / f"{name}.png")


def sweep(paged, layout, check, dense_graph, ours_bytes: int, repeats: int) -> list[dict]:
    """SWEEP's configs, graphed, timed in one alternating set with the graphed dense. A
    config whose output differs from the default's is reported and not timed."""
    fns, timed, results = [dense_graph], [], []
    for config in SWEEP:
        result = {"config": config}
        results.append(result)
        try:
            got = paged_pruned_decode(*paged, layout, **config)
            result["rel_error_vs_default"] = worst_row_error(got, check)
            if result["rel_error_vs_default"] >= 2e-2:
                continue
            fns.append(graphed(partial(paged_pruned_decode, *paged, layout, **config)))
        except Exception as error:  # e.g. Triton's OutOfResources: report, keep going
            result["error"] = str(error)[:300]
            continue
        timed.append(result)
    dense_s, *times = timed_many(fns, repeats)
    for result, seconds in zip(timed, times, strict=True):
        result |= {
            "leank_ms": seconds * 1e3,
            "speedup": dense_s / seconds,
            "leank_tb_s": ours_bytes / seconds / 1e12,
        }
    return results


def git_commit() -> str | None:
    import subprocess

    run = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return run.stdout.strip() or None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"b{r['batch']}/{r['context'] // 1024}K" for r in result["rows"]]
    ax.bar(labels, [r["speedup"] for r in result["rows"]], label="measured")
    ax.plot(
        labels,
        [r["byte_ideal_speedup"] for r in result["rows"]],
        "k_",
        markersize=30,
        label="byte ideal",
    )
    ax.axhline(1.0, color="grey")
    ax.set_ylabel("speedup over dense SDPA")
    ax.legend()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
