"""LeanK decode kernel vs dense decode attention over the same KV (GPU timing harness).

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), one layer, fp16,
paged with block 16; a random aligned mask at ``--sparsity`` (align 16, per-head budgets
drawn so some heads are fully pruned, as a trained mask has). Dense baseline: torch SDPA
(flash / cuDNN picks itself) over contiguous K/V of the same tokens with GQA expanded by
``enable_gqa``. Reports time, bytes each side must read, effective TB/s and the speedup;
JSON + PNG in benchmarks/results/. ``--smoke`` runs tiny shapes on CPU under
TRITON_INTERPRET=1 (checks the harness and correctness only; the times mean nothing).

Each row times dense and kernel v4 (``decode_triton.py``, one launch) in the same
alternating rounds: eager calls (the issue's measure: host launch cost included) and, on
the GPU, the same calls replayed from CUDA graphs (how vLLM runs decode; no host cost on
either side), plus each one's host time per eager call (``perf_counter`` around
back-to-back calls, no sync). ``--sweep`` also times v4's launch configs (tile, stages,
warps, tokens per split 256-16,384) against the same dense baseline, graphed, in one
alternating set, each checked against the reference first. ``--compile-sm90`` needs no
GPU: it compiles v4's configs for Hopper with the device's Triton and reports registers,
shared memory, async copies and tile buffers (``results/leank_triton_resources_v4.json``).
Kernel v3 (two launches, retired; git history) was timed beside v4 at 650e0c0:
``results/leank_decode_kernel.json`` has its rows, and ``plot`` draws whichever kernels a
result lists, so it still draws that file's v3 bars.

    .venv/bin/python benchmarks/leank_decode_kernel.py --sweep    # on the H200
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/leank_decode_kernel.py --smoke
    PYTHONPATH=/tmp/t36 .venv/bin/python benchmarks/leank_decode_kernel.py --compile-sm90
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
KERNELS = {"v4": paged_pruned_decode}


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


def host_seconds(fns: list, repeats: int, calls: int = 20) -> list[float]:
    """Median host seconds per eager call of each of ``fns``: ``calls`` back-to-back calls
    timed with perf_counter and no sync (the GPU queue absorbs them), synced between
    samples, rounds alternating as in ``timed_many``."""
    samples: list[list[float]] = [[] for _ in fns]
    for round_index in range(repeats):
        for step in range(len(fns)):
            which = (round_index + step) % len(fns)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(calls):
                fns[which]()
            samples[which].append((time.perf_counter() - started) / calls)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
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


# Launch configs --sweep times (each also covered by the GPU unit test's configs): v4's
# default, its tile/stage/warp variants, every split size from 256 to 16,384 tokens (the
# small shapes' question: how many splits at batch 1 and 8).
SWEEP = [
    {"kernel": "v4", "block_n": 64, "num_stages": 3},
    {"kernel": "v4", "block_n": 64, "num_stages": 4},
    {"kernel": "v4", "block_n": 32, "num_stages": 4},
    {"kernel": "v4", "block_n": 128, "num_stages": 3},
    {"kernel": "v4", "block_n": 64, "num_stages": 3, "num_warps": 8},
    *(
        {"kernel": "v4", "block_n": 64, "num_stages": 3, "tokens_per_split": tokens}
        for tokens in (256, 512, 1024, 2048, 4096, 16384)
    ),
    {"kernel": "v4", "block_n": 64, "num_stages": 4, "tokens_per_split": 256},
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
    parser.add_argument(
        "--kernels", default="v4", help=f"which kernels to time ({', '.join(KERNELS)})"
    )
    parser.add_argument(
        "--compile-sm90", action="store_true", help="compile v4 for sm_90 (no GPU) and exit"
    )
    args = parser.parse_args()
    if args.compile_sm90:
        compile_sm90()
        return
    kernels = args.kernels.split(",")
    if unknown := [name for name in kernels if name not in KERNELS]:
        parser.error(f"unknown kernels {unknown}; known: {', '.join(KERNELS)}")
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
        expected = None
        if smoke or batch * context <= 8 * 32768:  # the fp32 reference is slow past that
            expected = paged_pruned_decode_ref(*paged, layout)
        calls, errors, outputs = {}, {}, {}
        for name in kernels:
            kernel = KERNELS[name]
            # Twice: v4's second call finds the merge counters its first call left.
            first, check = kernel(*paged, layout).clone(), kernel(*paged, layout)
            reference = expected if expected is not None else first
            errors[name] = max(worst_row_error(first, reference), worst_row_error(check, reference))
            assert errors[name] < (1e-4 if smoke else 2e-2), f"{name} vs ref: {errors[name]}"
            calls[name], outputs[name] = partial(kernel, *paged, layout), check
        # What the sweep's configs must match: the reference where it ran.
        check = expected if expected is not None else outputs[kernels[0]]
        dense = partial(
            torch.nn.functional.scaled_dot_product_attention,
            paged[0].unsqueeze(2),
            dense_k,
            dense_v,
            enable_gqa=True,
        )
        dense_s, *ours_s = timed_many([dense, *calls.values()], args.repeats)
        host_s = host_seconds([dense, *calls.values()], args.repeats)
        sizes = layout.bytes_per_token(dtype_bytes)
        dense_bytes = batch * context * (sizes["k_dense"] + sizes["v_dense"])
        ours_bytes = batch * context * (sizes["k_stored"] + sizes["v_stored"])
        longest = paged[4].shape[1] * block_size
        row = {
            "batch": batch,
            "context": context,
            "default_tokens_per_split": {
                "v4": default_tokens_per_split(batch, kv_heads, longest, 64, torch.device(device)),
            },
            "dense_ms": dense_s * 1e3,
            "dense_tb_s": dense_bytes / dense_s / 1e12,
            "dense_host_us": host_s[0] * 1e6,
            "byte_ideal_speedup": dense_bytes / ours_bytes,
            "reference_checked": expected is not None,
        }
        for index, name in enumerate(calls):
            row[name] = {
                "ms": ours_s[index] * 1e3,
                "speedup": dense_s / ours_s[index],
                "tb_s": ours_bytes / ours_s[index] / 1e12,
                "host_us": host_s[index + 1] * 1e6,
                "worst_row_rel_error": errors[name],
            }
        if not smoke:
            try:
                dense_graph = graphed(dense)
                dense_g, *ours_g = timed_many(
                    [dense_graph, *(graphed(call) for call in calls.values())], args.repeats
                )
            except RuntimeError as error:  # keep the eager row if capture fails
                row["graph_error"] = str(error)[:500]
            else:
                row |= {
                    "graph_dense_ms": dense_g * 1e3,
                    "graph_dense_tb_s": dense_bytes / dense_g / 1e12,
                }
                for index, name in enumerate(calls):
                    row[name] |= {
                        "graph_ms": ours_g[index] * 1e3,
                        "graph_speedup": dense_g / ours_g[index],
                        "graph_tb_s": ours_bytes / ours_g[index] / 1e12,
                    }
                if args.sweep:
                    row["sweep"] = sweep(
                        paged, layout, check, dense_graph, ours_bytes, args.repeats
                    )
        rows.append(row)
        print(json.dumps(row), flush=True)
        del paged, dense_k, dense_v, dense, calls
    result = {
        "script": "benchmarks/leank_decode_kernel.py",
        "date": time.strftime("%Y-%m-%d"),
        "timing": f"median of {args.repeats} alternating rounds of 10 calls",
        "commit": git_commit(),
        "smoke": smoke,
        "device": torch.cuda.get_device_name() if not smoke else "cpu",
        "k_sparsity": 1 - layout.k_width / (kv_heads * head_dim),
        "pruned_heads": layout.pruned_heads,
        "kernels": kernels,
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
    config whose output differs from the checked default's is reported and not timed."""
    fns, timed, results = [dense_graph], [], []
    for config in SWEEP:
        result = {"config": config}
        results.append(result)
        launch = {key: value for key, value in config.items() if key != "kernel"}
        kernel = KERNELS[config["kernel"]]
        try:
            got = kernel(*paged, layout, **launch)
            result["rel_error_vs_default"] = worst_row_error(got, check)
            if result["rel_error_vs_default"] >= 2e-2:
                continue
            fns.append(graphed(partial(kernel, *paged, layout, **launch)))
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


# v4's configs for --compile-sm90: SWEEP's tiles/stages/warps plus a head keeping all 128
# channels (BLOCK_K 128); the split size is a runtime argument and compiles the same.
SM90_CONFIGS = [
    {"block_n": 64, "num_stages": 3, "num_warps": 4},
    {"block_n": 64, "num_stages": 4, "num_warps": 4},
    {"block_n": 32, "num_stages": 4, "num_warps": 4},
    {"block_n": 128, "num_stages": 3, "num_warps": 4},
    {"block_n": 64, "num_stages": 3, "num_warps": 8},
    {"block_n": 64, "num_stages": 3, "num_warps": 4, "block_k": 128},
]


def compile_sm90() -> None:
    """v4 compiled for Hopper at the benchmark's shapes (group 4, head_dim 128, fp16,
    page 16, 64 kept channels), with the alignment hints the launcher gives at run time;
    ``leank_triton_resources.py``'s report (registers, shared memory, async copies, tile
    buffers; that script's default mode runs this function) plus whether the folded
    merge's ordering is as designed: a CTA barrier before the one-thread acq_rel atomic,
    and L2-only (``.cg``) loads of the partials."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from leank_triton_resources import pipeline_report
    from triton_resources import resource_report

    from kv_manager.leank.kernels.decode_triton import _pruned_decode_kernel as fn

    kinds = {
        "*fp16": {"query", "k_cache", "v_cache"},
        "*fp32": {"value_sum", "out", "part_out", "part_stats"},
        "*i32": {"block_table", "seq_lens", "k_counts", "k_offsets", "kept_index", "v_slot",
                 "sum_slot", "tickets"},
        "fp32": {"scale_log2"},
    }  # fmt: skip
    # Integers the launcher sees divisible by 16 at these shapes (Triton specializes so).
    div16 = {"k_block_stride", "k_token_stride", "v_block_stride", "v_token_stride",
             "v_head_stride", "max_blocks", "tokens_per_split", "q_heads"}  # fmt: skip
    rows = []
    for config in SM90_CONFIGS:
        values = {
            "GROUP": 4, "HEAD_DIM": 128, "BLOCK_K": config.get("block_k", 64),
            "BLOCK_N": config["block_n"], "BLOCK_G": 16, "BLOCK_S": 32, "PAGE": 16,
            "KEPT_ALIGN": 16, "PRECISION": "tf32", "DOT_IN_F32": False,
        }  # fmt: skip
        constexprs = {name: values[name] for name in fn.arg_names if name in values}
        signature, hints = {}, {}
        for index, name in enumerate(fn.arg_names):
            kind = next((k for k, names in kinds.items() if name in names), "i32")
            signature[name] = "constexpr" if name in constexprs else kind
            if kind.startswith("*") or name in div16:
                hints[(index,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, hints),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]},
        )
        ptx = compiled.asm["ptx"]
        atomic = re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)
        before = ptx[: atomic.start()] if atomic else ""
        rows.append({
            "config": config,
            **resource_report(compiled),
            **pipeline_report(compiled),
            "merge": {
                "acq_rel_atomics": len(re.findall(r"atom\.global\.gpu\.acq_rel", ptx)),
                "barrier_right_before_atomic": before.rstrip().rfind("bar.sync")
                > before.rfind("st.global"),
                "partial_loads_cg": len(re.findall(r"ld\.global\.cg", ptx)),
            },
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "script": "benchmarks/leank_decode_kernel.py --compile-sm90",
        "date": time.strftime("%Y-%m-%d"),
        "triton": triton.__version__,
        "target": "sm_90 (compiled here, not run)",
        "kernel": "kv_manager/leank/kernels/decode_triton.py (v4)",
        "commit": git_commit(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "leank_triton_resources_v4.json").write_text(json.dumps(result, indent=2))


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

    fig, ax = plt.subplots(figsize=(8, 4))
    rows = result["rows"]
    labels = [f"b{r['batch']}/{r['context'] // 1024}K" for r in rows]
    positions = range(len(rows))
    bars = [(name, key) for name in result["kernels"] for key in ("speedup", "graph_speedup")]
    width = 0.8 / len(bars)
    for index, (name, key) in enumerate(bars):
        ax.bar(
            [p + (index - (len(bars) - 1) / 2) * width for p in positions],
            [r[name].get(key, 0.0) for r in rows],
            width,
            label=f"{name} {'graphed' if key.startswith('graph') else 'eager'}",
        )
    ax.plot(
        list(positions),
        [r["byte_ideal_speedup"] for r in rows],
        "k_",
        markersize=30,
        label="byte ideal",
    )
    ax.axhline(1.5, color="red", linestyle=":", label="target 1.5x")
    ax.set_xticks(list(positions), labels)
    ax.axhline(1.0, color="grey")
    ax.set_ylabel("speedup over dense SDPA")
    ax.legend()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
