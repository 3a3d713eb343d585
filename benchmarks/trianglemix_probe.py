"""Where the streaming and last-row kernels spend their time: launch variants and
leave-one-stage-out timings at Llama-3.1-8B shapes, on the GPU.

Each variant is a ``LaunchConfig`` override and optionally a pattern override; a pattern
override (no sinks, a shorter window) changes the function, so those rows are timing
probes only (their error is reported against the baseline of the same pattern, if any).
Variants with the default pattern must match the first variant's output.

    python3 benchmarks/trianglemix_probe.py --lengths 32768 65536 --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
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

from attention_backends.kernels.sparse_prefill_triton import (  # noqa: E402
    GLUON_CONFIG,
    TMA_CONFIG,
    sparse_prefill_triton,
)
from attention_backends.patterns import TrianglePattern  # noqa: E402

# label -> (config overrides, pattern overrides); "streaming" rows run without last rows.
# "cache_block" (not a config field) picks the paged cache: 64 (TMA boxes) or 16 (gather).
_W8 = {"num_warps": 8}
_GLUON = {"streaming_kernel": "gluon"}
_G64 = dataclasses.asdict(GLUON_CONFIG)  # the default on Hopper
STREAMING_VARIANTS: dict[str, tuple[dict, dict]] = {
    "triton 128x64 w4 s3": ({}, {}),
    "gluon 64x64 w4 s2, 2 per SM": (_G64, {}),
    "gluon 64x64 w4 s2, 2 per SM (repeat)": (_G64, {}),
    "gluon 64x64 w4 s2, 1 per SM": ({**_G64, "programs_per_sm": 1}, {}),
    "gluon 128x64 w8 s2, 1 per SM": ({**_GLUON, **_W8, "num_stages": 2, "programs_per_sm": 1}, {}),
    "gluon 64x64 w4 s2, no sinks": (_G64, {"sink_tokens": 0}),
    "gluon 64x64 w4 s2, window 448": (_G64, {"window_tokens": 448}),
}
LAST_ROWS_VARIANTS: dict[str, tuple[dict, dict]] = {
    "all, last 128x64 w4 s3": ({}, {}),
    "all, last 128x64 w4 s3 serial": ({"overlap_last_rows": False}, {}),
    "all, last 128x64 w4 s2": ({"last_num_stages": 2}, {}),
}


def launch_three_times(call) -> float:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    return float("nan")


def probe_length(num_tokens: int, streaming_base: dict, streaming_variants=STREAMING_VARIANTS,
                 last_rows_variants=LAST_ROWS_VARIANTS, timer=bench_ms) -> dict:  # fmt: skip
    generator = torch.Generator().manual_seed(num_tokens)
    query = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, generator=generator)
    keys = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    values = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    query, keys, values = (t.to("cuda", torch.bfloat16) for t in (query, keys, values))
    caches = {block: make_paged_kv(keys, values, generator, block) for block in (64, 16)}
    meta = [torch.tensor(v, dtype=torch.int32, device="cuda")
            for v in ([0, num_tokens], [num_tokens], [num_tokens])]  # fmt: skip
    out = torch.zeros_like(query)
    row: dict = {"num_tokens": num_tokens}
    firsts: dict[tuple, torch.Tensor] = {}

    def run(label: str, overrides: dict, pattern_overrides: dict, streaming_only: bool,
            base: dict) -> None:  # fmt: skip
        pattern = dataclasses.replace(TrianglePattern(), **pattern_overrides)
        if streaming_only:
            pattern = dataclasses.replace(pattern, last_q_tokens=0)
        overrides = {**base, **overrides}
        cache = caches[overrides.pop("cache_block", 64)]
        config = dataclasses.replace(TMA_CONFIG, **overrides)

        def call():
            return sparse_prefill_triton(query, *cache, *meta,
                                         pattern, 1 / math.sqrt(HEAD_DIM), out=out,
                                         config=config)  # fmt: skip

        try:
            output = call().clone()
            key = (tuple(sorted(pattern_overrides.items())), streaming_only)
            error = relative_error(output, firsts.setdefault(key, output))
            ms = timer(call)
            row[label] = {"ms": ms, "rel_err_vs_first": error}
        except Exception as exc:  # noqa: BLE001 - a variant may not fit; keep the others
            row[label] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
        print(f"{num_tokens // 1024}K {label}: {row[label]}", flush=True)

    for label, (overrides, pattern_overrides) in streaming_variants.items():
        run(label, overrides, pattern_overrides, True, {})
    for label, (overrides, pattern_overrides) in last_rows_variants.items():
        run(label, overrides, pattern_overrides, False, streaming_base)
    return row


def plot(runs: list[dict], path: Path) -> None:
    """One panel per probe run: each variant's time at the first length, in ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(runs), 1, figsize=(9, 2.2 + 0.28 * sum(
        len(run["rows"][0]) for run in runs)), squeeze=False)  # fmt: skip
    for axis, run in zip(axes[:, 0], runs, strict=True):
        row = run["rows"][0]
        timed = {k: v["ms"] for k, v in row.items() if isinstance(v, dict) and "ms" in v}
        axis.barh(list(timed), list(timed.values()))
        axis.invert_yaxis()
        axis.tick_params(labelsize=7)
        axis.set_title(f"{run['title']} ({row['num_tokens'] // 1024}K tokens)", fontsize=8)
        axis.set_xlabel("ms (median, do_bench)", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--streaming-base", default="{}",
                        help="JSON config overrides for the streaming kernel in 'all' rows")
    parser.add_argument("--out", default="trianglemix_probe.json")
    parser.add_argument("--launch-only", metavar="VARIANT",
                        help="launch this streaming variant a few times and exit (a target "
                             "for ncu: --kernel-name _streaming_rows_kernel --launch-skip 2)")
    args = parser.parse_args()
    if args.launch_only:
        only = {args.launch_only: STREAMING_VARIANTS[args.launch_only]}
        probe_length(args.lengths[0], {}, only, {}, timer=launch_three_times)
        return
    rows = [probe_length(n, json.loads(args.streaming_base)) for n in args.lengths]
    Path(args.out).write_text(json.dumps(rows, indent=1))
    plot([{"title": "probe", "rows": rows}], Path(args.out).with_suffix(".png"))
    labels = [k for k in rows[0] if k != "num_tokens"]
    print("\nvariant" + "".join(f"  {r['num_tokens'] // 1024:>6}K" for r in rows))
    for label in labels:
        cells = [r[label].get("ms", float("nan")) for r in rows]
        print(f"{label:44s}" + "".join(f"  {c:7.3f}" for c in cells))


if __name__ == "__main__":
    main()
