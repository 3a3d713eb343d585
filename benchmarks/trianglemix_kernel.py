"""TriangleMix kernel speed on the GPU: one attention layer at Llama-3.1-8B shapes.

Our Triton triangle kernel (paged KV, block size 16, shuffled physical blocks, like vLLM's
GPU cache) vs dense causal SDPA (cuDNN backend, the fastest dense) vs FlexAttention with the
same per-token mask, at 32K/64K/128K, bf16, batch 1. Also runs the GPU correctness tests
(``tests/gpu``) and records their result. Writes ``trianglemix_kernel.json`` and ``.png``.

    python benchmarks/trianglemix_kernel.py --out-dir benchmarks/results [--sweep]

``--sweep`` times several launch configurations of each kernel first and uses the best;
without it the kernel's default configuration is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends.kernels import sparse_prefill_ref  # noqa: E402
from attention_backends.kernels.sparse_prefill_triton import (  # noqa: E402
    GLUON_CONFIG,
    LaunchConfig,
    default_config,
    sparse_prefill_triton,
)
from attention_backends.patterns import TrianglePattern, kept_block_fraction  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128

# Launch-config variants (overrides of the cache's default config), by cache block size.
# "tma": K/V tiles as copy-engine boxes (cache block % block_n == 0); "gather": per-key or
# per-tile pointer loads.
_TMA_TILE = {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3, "kv_tma": True}
_GATHER_TILE = {"block_m": 256, "block_n": 64, "num_warps": 16, "num_stages": 2, "kv_tma": False}
STREAMING_SWEEP: dict[str, dict] = {
    "128x64 w4 s3 tma": _TMA_TILE,
    "128x32 w4 s3 tma": {**_TMA_TILE, "block_n": 32},
    "128x32 w4 s4 tma": {**_TMA_TILE, "block_n": 32, "num_stages": 4},
    "256x64 w16 s2 gather": _GATHER_TILE,
    "256x64 w8 s2 gather": {**_GATHER_TILE, "num_warps": 8},
    "gluon 64x64 w4 s2": dataclasses.asdict(GLUON_CONFIG),
}
STREAMING_SWEEP_BY_BLOCK = {
    16: ["256x64 w16 s2 gather"],
    64: ["gluon 64x64 w4 s2", "128x64 w4 s3 tma", "128x32 w4 s3 tma", "256x64 w16 s2 gather"],
    128: ["gluon 64x64 w4 s2", "128x64 w4 s3 tma", "128x32 w4 s3 tma"],
}
LAST_ROWS_SWEEP: dict[str, dict] = {
    "last 128x64 w4 s3 overlapped": {"last_block_m": 128, "last_num_warps": 4,
                                     "last_num_stages": 3, "overlap_last_rows": True},
    "last 128x64 w4 s3 serial": {"last_block_m": 128, "last_num_warps": 4,
                                 "last_num_stages": 3, "overlap_last_rows": False},
}  # fmt: skip


def run_gpu_tests(repo: Path) -> dict:
    """Run tests/gpu with pytest; return the counts and the summary line."""
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "--noconftest"],  # noqa: E501
        cwd=repo, capture_output=True, text=True,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr[-500:]
    counts = {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)
    }
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    print(proc.stdout[-3000:], flush=True)
    return {
        "returncode": proc.returncode,
        "summary": summary,
        "counts": counts,
        "failures": failures[:20],
        "seconds": round(time.time() - started, 1),
        "all_passed": proc.returncode == 0,
    }


def make_paged_kv(keys: torch.Tensor, values: torch.Tensor, generator: torch.Generator, block: int):
    """Write token-ordered K/V ``[S, Hkv, D]`` into a shuffled paged cache of ``block``-token
    blocks (K and V halves of one allocation, so the caches are strided views)."""
    num_tokens = keys.shape[0]
    num_blocks = num_tokens // block
    storage = torch.empty(
        num_blocks + 7, NUM_KV_HEADS, 2 * block, HEAD_DIM, dtype=keys.dtype, device="cuda"
    )
    key_cache, value_cache = storage[:, :, :block], storage[:, :, block:]
    physical = torch.randperm(num_blocks + 7, generator=generator)[:num_blocks].cuda()
    key_cache[physical] = keys.view(num_blocks, block, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    value_cache[physical] = values.view(num_blocks, block, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    block_table = physical.to(torch.int32).view(1, -1)
    return key_cache, value_cache, block_table


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


MIN_TIMED_RUNS = 7


def bench_ms(fn) -> float:
    """Median of at least MIN_TIMED_RUNS timed runs (do_bench times with CUDA events; its
    `rep` is a time budget, so slow kernels such as dense 128K get a larger one)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = 1000 * (time.perf_counter() - started)
    budget_ms = max(150.0, 1.3 * MIN_TIMED_RUNS * estimate_ms)
    return do_bench(fn, warmup=25, rep=budget_ms, return_mode="median")


def sweep_configs(call, base: LaunchConfig, cache_block: int) -> tuple[LaunchConfig, dict]:
    """Best streaming config (timed with no last rows), then the best last-rows config on
    top of it. A variant that fails to compile or launch is recorded, not fatal."""
    timings: dict = {}

    def best_of(variants: dict[str, dict], start: LaunchConfig, streaming_only: bool):
        """Fastest variant whose output matches the first variant's (a wrong kernel must
        not win the sweep); each result is printed as it comes (a hang loses nothing)."""
        best, best_ms, first_output = start, float("inf"), None
        for label, overrides in variants.items():
            config = dataclasses.replace(start, **overrides)
            try:
                output = call(config, streaming_only=streaming_only).clone()
                torch.cuda.synchronize()
                if first_output is None:
                    first_output = output
                error = relative_error(output, first_output)
                timings[f"{label} | rel_err_vs_first"] = error
                if not error < 2e-2:
                    timings[label] = f"wrong: relative error {error:.2e} vs the first variant"
                    continue
                timings[label] = bench_ms(
                    lambda config=config: call(config, streaming_only=streaming_only)
                )
            except Exception as error:  # noqa: BLE001 - a config may not fit (regs, smem)
                timings[label] = f"failed: {type(error).__name__}: {str(error)[:160]}"
                continue
            finally:
                print(f"  sweep {label}: {timings.get(label)}", flush=True)
            if timings[label] < best_ms:
                best, best_ms = config, timings[label]
        return best

    streaming = {name: STREAMING_SWEEP[name] for name in STREAMING_SWEEP_BY_BLOCK[cache_block]}
    best_streaming = best_of(streaming, base, streaming_only=True)
    last_rows = {
        name: overrides
        for name, overrides in LAST_ROWS_SWEEP.items()
        if cache_block % overrides.get("last_block_n", base.last_block_n) == 0 or cache_block < 64
    }
    return best_of(last_rows, best_streaming, streaming_only=False), timings


def bench_length(
    num_tokens: int,
    sweep: bool,
    with_flex: bool,
    check_reference: bool,
    headline_block: int,
    alt_cache_blocks: list[int],
) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator().manual_seed(num_tokens)
    pattern = TrianglePattern()  # paper defaults: sink 8, window 512, last 128
    streaming_only_pattern = dataclasses.replace(pattern, last_q_tokens=0)
    shape_q = (num_tokens, NUM_Q_HEADS, HEAD_DIM)
    shape_kv = (num_tokens, NUM_KV_HEADS, HEAD_DIM)
    query = torch.randn(shape_q, generator=generator).to("cuda", torch.bfloat16)
    keys = torch.randn(shape_kv, generator=generator).to("cuda", torch.bfloat16)
    values = torch.randn(shape_kv, generator=generator).to("cuda", torch.bfloat16)
    key_cache, value_cache, block_table = make_paged_kv(keys, values, generator, headline_block)
    meta = dict(
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device="cuda"),
        prompt_lens=torch.tensor([num_tokens], dtype=torch.int32, device="cuda"),
    )
    scale = 1 / math.sqrt(HEAD_DIM)
    out = torch.zeros_like(query)  # finite: streaming-only sweep runs leave last rows as is

    def ours(config: LaunchConfig, streaming_only: bool = False, cache=None):
        k_cache, v_cache, table = cache or (key_cache, value_cache, block_table)
        return sparse_prefill_triton(
            query, k_cache, v_cache, table, meta["query_start_loc"], meta["seq_lens"],
            meta["prompt_lens"], streaming_only_pattern if streaming_only else pattern, scale,
            out=out, config=config,
        )  # fmt: skip

    row: dict = {"num_tokens": num_tokens}
    q_bhsd = query.transpose(0, 1).unsqueeze(0).contiguous()
    k_bhsd = keys.transpose(0, 1).unsqueeze(0).contiguous()
    v_bhsd = values.transpose(0, 1).unsqueeze(0).contiguous()
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["cudnn_dense_ms"] = bench_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q_bhsd, k_bhsd, v_bhsd, is_causal=True, enable_gqa=True
            )
        )

    outputs: dict[str, torch.Tensor] = {}  # suffix -> output, checked below

    def time_cache(block: int, suffix: str, cache=None) -> LaunchConfig:
        """Sweep (optionally) and time the kernel on one paged cache; keep its output."""

        def run(c, streaming_only=False):
            return ours(c, streaming_only, cache)

        config = default_config(*(cache or (key_cache, value_cache))[:2])
        if sweep:
            config, row[f"sweep_ms{suffix}"] = sweep_configs(run, config, block)
        row[f"config{suffix}"] = dataclasses.asdict(config)
        row[f"ours_ms{suffix}"] = bench_ms(lambda: run(config))
        row[f"ours_streaming_part_ms{suffix}"] = bench_ms(lambda: run(config, True))
        row[f"ours_last_rows_part_ms{suffix}"] = (
            row[f"ours_ms{suffix}"] - row[f"ours_streaming_part_ms{suffix}"]
        )
        row[f"ours_ms_repeat{suffix}"] = bench_ms(lambda: run(config))  # timing spread
        out.fill_(float("nan"))
        run(config)
        row[f"ours_all_rows_written{suffix}"] = not torch.isnan(out).any().item()
        outputs[suffix] = out.clone()
        out.zero_()
        return config

    time_cache(headline_block, "")
    for block in alt_cache_blocks:  # the same kernel on caches with other block sizes
        cache = make_paged_kv(keys, values, generator, block)
        time_cache(block, f"_block{block}", cache)
        del cache

    if check_reference:
        reference = sparse_prefill_ref(
            query, key_cache, value_cache, block_table, meta["query_start_loc"], meta["seq_lens"],
            meta["prompt_lens"], pattern, scale, query_block_tokens=512,
        )  # fmt: skip
        for suffix, output in outputs.items():
            row[f"rel_err_vs_reference_fp32{suffix}"] = relative_error(output, reference)
        del reference

    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        sink, window, last = pattern.sink_tokens, pattern.window_tokens, pattern.last_q_tokens

        def triangle_mask(b, h, q_idx, kv_idx):
            kept = (kv_idx < sink) | (q_idx - kv_idx < window) | (q_idx >= num_tokens - last)
            return (q_idx >= kv_idx) & kept

        try:
            compiled_flex = torch.compile(flex_attention)
            block_mask = create_block_mask(
                triangle_mask,
                None,
                None,
                num_tokens,
                num_tokens,
                device="cuda",
                BLOCK_SIZE=128,
                _compile=True,
            )
            flex_out = compiled_flex(
                q_bhsd, k_bhsd, v_bhsd, block_mask=block_mask, enable_gqa=True, scale=scale
            )
            row["flex_ms"] = bench_ms(
                lambda: compiled_flex(
                    q_bhsd, k_bhsd, v_bhsd, block_mask=block_mask, enable_gqa=True, scale=scale
                )
            )
            for suffix, output in outputs.items():
                row[f"rel_err_vs_flex{suffix}"] = relative_error(
                    output, flex_out[0].transpose(0, 1)
                )
            del flex_out, block_mask
        except Exception as error:  # noqa: BLE001 - report, keep the other numbers
            row["flex_error"] = f"{type(error).__name__}: {str(error)[:200]}"

    # work accounting
    element_fraction = pattern.kept_fraction(num_tokens)
    kept_pairs = element_fraction * num_tokens * (num_tokens + 1) / 2
    flops = 4 * kept_pairs * NUM_Q_HEADS * HEAD_DIM
    row["kept_fraction_elements"] = element_fraction
    row["kept_fraction_blocks_64"] = kept_block_fraction(pattern, num_tokens, 64)
    row["kept_fraction_blocks_128"] = kept_block_fraction(pattern, num_tokens, 128)
    row["ideal_ms_elements"] = row["cudnn_dense_ms"] * element_fraction
    row["ideal_ms_blocks_64"] = row["cudnn_dense_ms"] * row["kept_fraction_blocks_64"]
    row["ideal_ms_blocks_128"] = row["cudnn_dense_ms"] * row["kept_fraction_blocks_128"]
    row["speedup_vs_cudnn"] = row["cudnn_dense_ms"] / row["ours_ms"]
    row["pct_of_ideal_elements"] = 100 * row["ideal_ms_elements"] / row["ours_ms"]
    row["pct_of_ideal_blocks_64"] = 100 * row["ideal_ms_blocks_64"] / row["ours_ms"]
    row["pct_of_ideal_blocks_128"] = 100 * row["ideal_ms_blocks_128"] / row["ours_ms"]
    row["ours_tflops_kept_elements"] = flops / row["ours_ms"] / 1e9
    row["cudnn_tflops"] = (
        4 * num_tokens * (num_tokens + 1) / 2 * NUM_Q_HEADS * HEAD_DIM / row["cudnn_dense_ms"] / 1e9
    )
    min_bytes = 2 * (
        2 * num_tokens * NUM_Q_HEADS * HEAD_DIM + 2 * num_tokens * NUM_KV_HEADS * HEAD_DIM
    )
    row["ours_tbps_min_bytes"] = min_bytes / row["ours_ms"] / 1e9
    if "flex_ms" in row:
        row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
        row["flex_pct_of_ideal_elements"] = 100 * row["ideal_ms_elements"] / row["flex_ms"]
    for block in alt_cache_blocks:
        ms = row[f"ours_ms_block{block}"]
        row[f"pct_of_ideal_elements_block{block}"] = 100 * row["ideal_ms_elements"] / ms
        row[f"pct_of_ideal_blocks_128_block{block}"] = 100 * row["ideal_ms_blocks_128"] / ms
        row[f"speedup_vs_cudnn_block{block}"] = row["cudnn_dense_ms"] / ms
        if "flex_ms" in row:
            row[f"speedup_vs_flex_block{block}"] = row["flex_ms"] / ms
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["lengths"]
    labels = [f"{row['num_tokens'] // 1024}K" for row in rows]
    series = [
        ("SDPA cuDNN dense", "cudnn_dense_ms"),
        ("FlexAttention, same mask", "flex_ms"),
        ("ours (Triton)", "ours_ms"),
        ("ideal: cuDNN x kept elements", "ideal_ms_elements"),
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.2
    for index, (name, key) in enumerate(series):
        values = [row.get(key, float("nan")) for row in rows]
        left.bar([i + (index - 1.5) * width for i in range(len(rows))], values, width, label=name)
    left.set_yscale("log")
    left.set_xticks(range(len(rows)), labels)
    left.set_ylabel("ms, one layer (log)")
    left.set_title("TriangleMix attention, Llama-3.1-8B layer, bf16, H200")
    left.legend(fontsize=8)
    right.plot(
        labels, [row["pct_of_ideal_elements"] for row in rows], "o-", label="% of ideal (elements)"
    )
    right.plot(
        labels,
        [row["pct_of_ideal_blocks_128"] for row in rows],
        "s-",
        label="% of ideal (128-blocks)",
    )
    right.axhline(80, color="gray", linestyle="--", label="target 80%")
    if all("speedup_vs_flex" in row for row in rows):
        twin = right.twinx()
        twin.plot(
            labels,
            [row["speedup_vs_flex"] for row in rows],
            "^-",
            color="tab:red",
            label="x vs Flex",
        )
        twin.axhline(2, color="tab:red", linestyle=":")
        twin.set_ylabel("speedup vs FlexAttention", color="tab:red")
    right.set_ylabel("% of ideal")
    right.set_ylim(0, 110)
    right.legend(fontsize=8, loc="lower left")
    right.set_title("fraction of ideal; speedup vs Flex (red)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--sweep", action="store_true", help="time launch configs, use the best")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument(
        "--alt-cache-blocks", type=int, nargs="*", default=[64, 128],
        help="also time the kernel on paged caches with these block sizes",
    )  # fmt: skip
    parser.add_argument(
        "--headline-block", type=int, default=16, help="cache block size of the headline"
    )
    args = parser.parse_args()
    import triton

    repo = Path(__file__).resolve().parents[1]
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": {
            "q_heads": NUM_Q_HEADS,
            "kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "bf16",
        },
        "pattern": dataclasses.asdict(TrianglePattern()),
        "kv_cache": f"paged, block {args.headline_block} (headline) and {args.alt_cache_blocks}, shuffled physical blocks",  # noqa: E501
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "timing": f"median of >= {MIN_TIMED_RUNS} timed runs per figure (triton do_bench)",
    }
    if not args.no_tests:
        results["gpu_tests"] = run_gpu_tests(repo)
    results["lengths"] = []
    for num_tokens in args.lengths:
        row = bench_length(
            num_tokens,
            args.sweep,
            not args.no_flex,
            num_tokens <= 65536,
            args.headline_block,
            args.alt_cache_blocks,
        )
        results["lengths"].append(row)
        torch.cuda.empty_cache()
        brief = {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in row.items()
            if not k.startswith("sweep_ms")
        }
        print(json.dumps(brief), flush=True)
        for key in [k for k in row if k.startswith("sweep_ms")]:
            print(
                key,
                json.dumps(
                    {k: v if isinstance(v, str) else round(v, 4) for k, v in row[key].items()}
                ),
                flush=True,
            )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trianglemix_kernel.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / "trianglemix_kernel.png")
    print(
        "\nlen   cudnn_ms  flex_ms  ours_ms  ideal_ms  %ideal(el)  %ideal(blk128)  x_cudnn  x_flex  TFLOP/s"  # noqa: E501
    )
    for row in results["lengths"]:
        print(
            f"{row['num_tokens'] // 1024:>3}K  {row['cudnn_dense_ms']:8.2f}  {row.get('flex_ms', float('nan')):7.2f}"  # noqa: E501
            f"  {row['ours_ms']:7.3f}  {row['ideal_ms_elements']:8.3f}  {row['pct_of_ideal_elements']:10.1f}"  # noqa: E501
            f"  {row['pct_of_ideal_blocks_128']:14.1f}  {row['speedup_vs_cudnn']:7.1f}"
            f"  {row.get('speedup_vs_flex', float('nan')):6.2f}  {row['ours_tflops_kept_elements']:7.0f}"  # noqa: E501
        )
    for block in args.alt_cache_blocks:
        for row in results["lengths"]:
            print(
                f"cache block {block}: {row['num_tokens'] // 1024}K ours {row[f'ours_ms_block{block}']:.3f} ms"  # noqa: E501
                f" ({row[f'pct_of_ideal_elements_block{block}']:.1f}% of ideal,"
                f" {row[f'pct_of_ideal_blocks_128_block{block}']:.1f}% of 128-block ideal,"
                f" x{row.get(f'speedup_vs_flex_block{block}', float('nan')):.2f} vs Flex)"
            )
    if "gpu_tests" in results:
        print("gpu tests:", results["gpu_tests"]["summary"])


if __name__ == "__main__":
    main()
