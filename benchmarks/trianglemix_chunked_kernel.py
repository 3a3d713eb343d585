"""TriangleMix kernel under chunked prefill: one layer's prompt in 8K chunks vs one call.

vLLM prefills a long prompt in chunks (8192 tokens a step in `gpu_serving_ttft.py`), so a
sparse layer runs the kernel once per chunk, each chunk's queries over the cache so far,
with the prompt's own last rows only in the last chunk, and a block table as wide as the
server's max model length. This times exactly that sequence of calls (Llama-3.1-8B layer
shape, bf16, 64-token blocks) against one call over the whole prompt: the difference is what
chunking costs the kernel, which the in-server TTFT pays 16 times per step of layers.

    python3 benchmarks/trianglemix_chunked_kernel.py --out-dir $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trianglemix_kernel import (  # noqa: E402
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_Q_HEADS,
    bench_ms,
    make_paged_kv,
    relative_error,
)

from attention_backends.dispatch import pattern_for_sub_batch, split_prefill_decode  # noqa: E402
from attention_backends.kernels.sparse_prefill_triton import (  # noqa: E402
    default_config,
    sparse_prefill_triton,
)
from attention_backends.patterns import TrianglePattern  # noqa: E402

BLOCK = 64


def bench_prompt(num_tokens: int, chunk: int, max_model_len: int) -> dict:
    generator = torch.Generator().manual_seed(num_tokens)
    pattern = TrianglePattern()
    streaming_only = dataclasses.replace(pattern, last_q_tokens=0)
    query = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, generator=generator).to(
        "cuda", torch.bfloat16)
    keys = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator).to(
        "cuda", torch.bfloat16)
    values = torch.randn_like(keys)
    key_cache, value_cache, table = make_paged_kv(keys, values, generator, BLOCK)
    # vLLM's block table has a column per block of the max model length
    wide_table = torch.zeros(1, max_model_len // BLOCK, dtype=torch.int32, device="cuda")
    wide_table[:, : table.shape[1]] = table
    config = default_config(key_cache, value_cache)
    scale = 1 / math.sqrt(HEAD_DIM)
    out = torch.zeros_like(query)
    as_int32 = lambda *values: torch.tensor(values, dtype=torch.int32, device="cuda")  # noqa: E731
    prompt_lens = as_int32(num_tokens)

    def whole(which=pattern) -> None:
        sparse_prefill_triton(query, key_cache, value_cache, wide_table, as_int32(0, num_tokens),
                              as_int32(num_tokens), prompt_lens, which, scale, out=out,
                              config=config)

    bounds = list(range(0, num_tokens, chunk)) + [num_tokens]
    chunks = [(start, end, as_int32(0, end - start), as_int32(end))
              for start, end in zip(bounds, bounds[1:], strict=False)]
    # What the CUDA backend launches per chunk: the pattern dispatch.pattern_for_sub_batch
    # picks for that chunk's rows (no last rows in chunks that hold none of them).
    served_patterns = [
        pattern_for_sub_batch(pattern, split_prefill_decode(
            [0, end - start], [end], wide_table, [num_tokens]).prefill)
        for start, end, _, _ in chunks
    ]

    def chunked(patterns: list) -> None:
        for (start, end, query_start_loc, seq_lens), which in zip(chunks, patterns,
                                                                  strict=True):
            sparse_prefill_triton(query[start:end], key_cache, value_cache, wide_table,
                                  query_start_loc, seq_lens, prompt_lens, which, scale,
                                  out=out[start:end], config=config)

    def chunked_all(which=pattern) -> None:
        chunked([which] * len(chunks))

    def chunked_as_served() -> None:
        chunked(served_patterns)

    whole()
    reference = out.clone()
    errors = {}
    for name, run in (("chunked", chunked_all), ("chunked_as_served", chunked_as_served)):
        out.zero_()
        run()
        errors[f"rel_err_{name}_vs_whole"] = relative_error(out, reference)
    row = {
        "num_tokens": num_tokens, "chunk_tokens": chunk, "chunks": len(chunks),
        "block_table_columns": wide_table.shape[1], **errors,
    }
    # alternate the two shapes of work, twice each (every figure: median of >= 7 runs)
    for repeat in range(2):
        row[f"whole_ms_{repeat}"] = bench_ms(whole)
        row[f"chunked_ms_{repeat}"] = bench_ms(chunked_all)
        row[f"chunked_as_served_ms_{repeat}"] = bench_ms(chunked_as_served)
    row["whole_streaming_only_ms"] = bench_ms(lambda: whole(streaming_only))
    row["chunked_streaming_only_ms"] = bench_ms(lambda: chunked_all(streaming_only))
    row["whole_ms"] = min(row["whole_ms_0"], row["whole_ms_1"])
    row["chunked_ms"] = min(row["chunked_ms_0"], row["chunked_ms_1"])
    row["chunked_as_served_ms"] = min(row["chunked_as_served_ms_0"],
                                      row["chunked_as_served_ms_1"])
    row["chunking_overhead_ms"] = row["chunked_ms"] - row["whole_ms"]
    row["last_rows_in_chunked_ms"] = row["chunked_ms"] - row["chunked_streaming_only_ms"]
    return row


def plot(result: dict, png: Path) -> None:
    """Per length: one call vs the chunks as launched before and since the last-row skip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["lengths"]
    series = [("one call", "whole_ms"), ("8K chunks, last rows in every chunk", "chunked_ms"),
              ("8K chunks as served now", "chunked_as_served_ms"),
              ("8K chunks, streaming rows only", "chunked_streaming_only_ms")]
    series = [(label, key) for label, key in series if key in rows[0]]
    fig, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for offset, (label, key) in enumerate(series):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(rows))]
        axis.bar(xs, [row[key] for row in rows], width, label=label)
    axis.set_xticks(range(len(rows)), [f"{row['num_tokens'] // 1024}K" for row in rows])
    axis.set_ylabel("one 8B-shape layer, ms (median of >= 7)")
    axis.set_title(f"TriangleMix kernel under chunked prefill, {result['gpu']}")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 130048])
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=131072)
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON, run nothing")
    args = parser.parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    result = {"benchmark": "trianglemix_chunked_kernel", "date": time.strftime("%Y-%m-%d"),
              "gpu": torch.cuda.get_device_name(), "block_size": BLOCK,
              "timing": "median of >= 7 timed runs per figure (triton do_bench); whole and "
                        "chunked alternate twice, the lower of each pair kept",
              "lengths": []}
    for num_tokens in args.lengths:
        row = bench_prompt(num_tokens, args.chunk, args.max_model_len)
        result["lengths"].append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)
        torch.cuda.empty_cache()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "trianglemix_chunked_kernel.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
