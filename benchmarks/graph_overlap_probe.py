"""Which process-state change slows a CUDA graph's replay after a TriangleMix prefill (GPU host).

Issue 18: decode in the TriangleMix server runs the same CUDA graph as in tessera's dense
mode, with the same kernels and the same GPU time, yet each step is ~0.2 ms longer. The
torch profile (`gpu_serving_ttft.py --profile-decode`, 2026-12-01) shows why: in the FA3
and dense servers consecutive kernels of the decode graph overlap (programmatic dependent
launch: the next kernel starts before the previous one ends, ~110 of 417 boundaries), in
the TriangleMix server none do, and every boundary has a 0.2-0.4 us gap.

This reproduces the effect outside vLLM and names its cause. Each scenario runs in a fresh
process: capture a decode-like graph (small bf16 GEMMs + elementwise ops, as cuBLASLt and
inductor launch them), time its replay, do one thing a TriangleMix prefill does, time the
replay again. Scenarios: nothing; create a high-priority stream; create it and run work on
it with stream waits (what the last-rows overlap does); the same with a normal-priority
stream; a plain Triton kernel; the real sparse prefill with and without the side stream.

    python3 benchmarks/graph_overlap_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCENARIOS = ("nothing", "priority_stream_created", "priority_stream_used",
             "normal_stream_used", "triton_kernel", "sparse_prefill_overlap",
             "sparse_prefill_serial")


def pdl_kernel():
    """An elementwise Triton kernel launched with programmatic dependent launch (PDL), the
    way vLLM's decode graphs launch theirs: it may start before the previous kernel ends,
    and waits for it at ``gdc_wait``."""
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def scale_pdl(pointer, n, BLOCK: tl.constexpr):
        gdc_launch_dependents()
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        gdc_wait()
        values = tl.load(pointer + offsets, mask=mask)
        tl.store(pointer + offsets, values * 0.999, mask=mask)

    def launch(tensor) -> None:
        scale_pdl[(triton.cdiv(tensor.numel(), 1024),)](tensor, tensor.numel(), BLOCK=1024,
                                                         launch_pdl=True)

    return launch


def build_graph(torch, layers: int = 32, hidden: int = 2048):
    """A decode-like step: per layer two GEMMs of one token row, elementwise ops, and two
    PDL-launched Triton kernels."""
    device, dtype = "cuda", torch.bfloat16
    scale = pdl_kernel()
    weights = [(torch.randn(hidden, hidden, device=device, dtype=dtype) * 0.02,
                torch.randn(hidden, hidden, device=device, dtype=dtype) * 0.02)
               for _ in range(layers)]
    x = torch.randn(1, hidden, device=device, dtype=dtype)

    def step() -> None:
        h = x
        for first, second in weights:
            # F.linear (x @ W^T), as vLLM's linear layers call cuBLASLt
            h = torch.nn.functional.silu(torch.nn.functional.linear(h, first))
            h = torch.nn.functional.linear(h, second) * 0.5 + h
            scale(h)
            scale(h)
        x.copy_(h.clamp(-1, 1))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def replay_us(torch, graph, replays: int = 200, blocks: int = 7) -> float:
    """Median over blocks of the mean replay time (CUDA events, back-to-back replays)."""
    times = []
    for _ in range(blocks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return statistics.median(times)


def overlapping_boundaries(torch, graph, replays: int = 3) -> dict:
    """Kernel boundaries inside replays where the next kernel starts before the previous one
    ends (programmatic dependent launch at work), from a torch profile; profiled last, so the
    profiler's own start-up never precedes a timing."""
    import gzip
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    path = Path(tempfile.mkdtemp()) / "trace.json.gz"
    prof.export_chrome_trace(str(path))
    with gzip.open(path, "rt") as handle:
        events = json.load(handle)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(kernels, kernels[1:], strict=False)]
    pdl = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(kernels, kernels[1:], strict=False)
           if "scale_pdl" in a["name"] and "scale_pdl" in b["name"]]
    return {"kernels": len(kernels), "overlapping": sum(g < 0 for g in gaps),
            "gap_us_median": statistics.median(gaps) if gaps else None,
            "pdl_pairs": len(pdl), "pdl_pairs_overlapping": sum(g < 0 for g in pdl),
            "pdl_pair_gap_us_median": statistics.median(pdl) if pdl else None}


def side_stream_work(torch, priority: int) -> None:
    side = torch.cuda.Stream(priority=priority)
    main = torch.cuda.current_stream()
    a = torch.randn(1024, 1024, device="cuda")
    side.wait_stream(main)
    with torch.cuda.stream(side):
        a = a @ a
    main.wait_stream(side)
    torch.cuda.synchronize()


def triton_kernel(torch) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(pointer, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(pointer + offsets, tl.load(pointer + offsets, mask=mask) + 1, mask=mask)

    values = torch.zeros(4096, device="cuda")
    add_one[(4,)](values, 4096, BLOCK=1024)
    torch.cuda.synchronize()


def sparse_prefill(torch, overlap: bool) -> None:
    import dataclasses

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trianglemix_kernel import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, make_paged_kv

    from attention_backends.kernels.sparse_prefill_triton import (
        default_config,
        sparse_prefill_triton,
    )
    from attention_backends.patterns import TrianglePattern

    tokens = 4096
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(tokens, NUM_Q_HEADS, HEAD_DIM, generator=generator).to(
        "cuda", torch.bfloat16)
    keys = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator).to(
        "cuda", torch.bfloat16)
    key_cache, value_cache, table = make_paged_kv(keys, torch.randn_like(keys), generator, 64)
    config = dataclasses.replace(default_config(key_cache, value_cache),
                                 overlap_last_rows=overlap)
    as_int32 = lambda *v: torch.tensor(v, dtype=torch.int32, device="cuda")  # noqa: E731
    sparse_prefill_triton(query, key_cache, value_cache, table, as_int32(0, tokens),
                          as_int32(tokens), as_int32(tokens), TrianglePattern(),
                          1 / math.sqrt(HEAD_DIM), config=config)
    torch.cuda.synchronize()


def run_scenario(name: str) -> dict:
    import torch

    graph = build_graph(torch)
    before = replay_us(torch, graph)
    if name == "priority_stream_created":
        torch.cuda.Stream(priority=-1)
    elif name == "priority_stream_used":
        side_stream_work(torch, priority=-1)
    elif name == "normal_stream_used":
        side_stream_work(torch, priority=0)
    elif name == "triton_kernel":
        triton_kernel(torch)
    elif name in ("sparse_prefill_overlap", "sparse_prefill_serial"):
        sparse_prefill(torch, overlap=name.endswith("overlap"))
    after = replay_us(torch, graph)
    again = replay_us(torch, graph)
    return {"scenario": name, "replay_us_before": before, "replay_us_after": after,
            "replay_us_after_again": again, "change_pct": 100 * (after / before - 1),
            "after": overlapping_boundaries(torch, graph)}


def plot(result: dict, png: Path) -> None:
    """Replay time before and after each scenario, with the kernel overlaps seen after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["rows"] if "error" not in row]
    names = [row["scenario"] for row in rows]
    xs = range(len(rows))
    fig, axis = plt.subplots(figsize=(11, 4))
    axis.bar([x - 0.2 for x in xs], [row["replay_us_before"] for row in rows], 0.4,
             label="replay before")
    axis.bar([x + 0.2 for x in xs], [row["replay_us_after"] for row in rows], 0.4,
             label="replay after")
    for x, row in zip(xs, rows, strict=True):
        axis.annotate(f"{row['after']['overlapping']} overlaps", (x, row["replay_us_after"]),
                      ha="center", va="bottom", fontsize=7)
    axis.set_xticks(list(xs), names, rotation=20, fontsize=7)
    axis.set_ylabel("graph replay (us, median of 7 blocks)")
    axis.set_title("decode-like CUDA graph replay before / after each thing a sparse prefill does")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scenario", choices=SCENARIOS, help="run one (in this process)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes a scenario")
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON")
    args = parser.parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    if args.scenario:
        print(json.dumps(run_scenario(args.scenario)))
        return
    rows = []
    for repeat in range(args.repeats):
        for name in SCENARIOS if repeat % 2 == 0 else reversed(SCENARIOS):
            done = subprocess.run([sys.executable, __file__, "--scenario", name],
                                  capture_output=True, text=True, timeout=240)
            if done.returncode != 0:
                rows.append({"scenario": name, "error": done.stderr[-1500:]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "graph_overlap_probe", "date": time.strftime("%Y-%m-%d"),
              "what": __doc__.split("\n\n")[1].replace("\n", " "), "rows": rows}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph_overlap_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
