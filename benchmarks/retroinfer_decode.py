"""One decode step's attention at Llama-3.1-8B shape: RetroInfer vs dense SDPA vs Quest.

Shape: 32 query heads, 8 KV heads, head dim 128, bf16; contexts 128K, 512K, 1M (where memory
allows), batch 1 and 8. Keys are random with a shared offset (speed does not depend on the
values; cluster sizes from k-means on them are what a step reads). One wave index is built
per context (kv_manager/retroinfer/wave_index.py, on the GPU; its time is reported
separately) and tiled over the batch: every sequence of a batch shares the same index tensors'
values, each row reads its own copy.

GPU-resident mode, per (context, batch), in one run over the same cache tensors
([B, 8, L, 128], clusters contiguous, steady zone at the end):
- dense: torch SDPA, GQA as [B, 8, 4, d] queries per KV head (no mask: one position);
- retroinfer: kernels/decode_triton.decode_step, default budget (1.8% of the clusters exact
  + 23.2% estimated + steady zone 4 + 64), eager and CUDA-graphed, with a per-stage split;
- quest: top-k 16-token pages by the Quest bound (per-page channel min/max), the same number
  of exactly read tokens as RetroInfer, through the same ranges-attention kernel.
Each: median of --reps (>= 5) timed with CUDA events; bytes each must read from HBM and the
fraction of 4.8 TB/s that time implies. Also the max per-row error of the Triton step vs
its torch reference (decode_ref.decode_step_ref) at that size, batch 1.

KV-in-CPU-memory mode (contexts --offload-contexts, default 128K), per decode step of one
layer, over --offload-steps steps of a slowly drifting query (decode queries are correlated
step to step; the hit rate depends on it): retroinfer with the wave buffer (index + steady
zone on the GPU, full KV in pinned host memory, a 5% cluster cache, misses copied on a side
stream) vs copying the layer's whole KV to the GPU then SDPA vs Quest fetching its top-k
pages from host memory. Reported as step time and attention-only tokens/s for a 32-layer
model (B / (32 x step time)).

Needs only torch + Triton (no vLLM, no network). On the H200:
    python benchmarks/retroinfer_decode.py --out /tmp/retroinfer_out
Here (CPU, Triton interpreter, tiny sizes, checks the code paths only):
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/retroinfer_decode.py --smoke --out /tmp/x
Draw the PNG from a JSON:
    .venv/bin/python benchmarks/retroinfer_decode.py --plot-only results/retroinfer_decode.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_manager.retroinfer.config import DecodeBudget, WaveIndexConfig  # noqa: E402
from kv_manager.retroinfer.kernels import decode_ref as ref  # noqa: E402
from kv_manager.retroinfer.kernels import decode_triton as tri  # noqa: E402
from kv_manager.retroinfer.wave_buffer import WaveBuffer  # noqa: E402
from kv_manager.retroinfer.wave_index import WaveIndex, build_wave_index  # noqa: E402

HBM_BYTES_PER_S = 4.8e12
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP = Q_HEADS // KV_HEADS
QUEST_PAGE = 16
LAYERS = 32
# bf16 on the GPU. The smoke run uses fp16: the Triton interpreter computes tl.dot of bf16
# operands wrongly (checked: 16x16 bf16 dot off by 1e10 under TRITON_INTERPRET=1, fp16 exact),
# so a bf16 smoke run could not check the kernels against the reference.
DTYPE = {"value": torch.bfloat16}


def timed(fn: Callable[[], Any], reps: int, device: torch.device) -> list[float]:
    """Milliseconds per call, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tick) * 1e3)
    return times


def summary(times: list[float], bytes_read: float | None = None) -> dict[str, Any]:
    median = statistics.median(times)
    out = {"median_ms": round(median, 4), "min_ms": round(min(times), 4), "reps": len(times)}
    if bytes_read is not None:
        out["bytes"] = int(bytes_read)
        out["hbm_fraction"] = round(bytes_read / (median / 1e3) / HBM_BYTES_PER_S, 4)
    return out


def graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any] | None:
    """The call captured in a CUDA graph (launch overhead gone), or None off CUDA."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def random_kv(tokens: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (tokens, KV_HEADS, HEAD_DIM)
    # A shared offset per head, like real keys; clusters then differ in size as they do.
    offset = torch.randn(1, KV_HEADS, HEAD_DIM, generator=generator, device=device)
    keys = torch.randn(shape, generator=generator, device=device) + 2 * offset
    values = torch.randn(shape, generator=generator, device=device)
    return keys.to(DTYPE["value"]), values.to(DTYPE["value"])


class Layout:
    """Device tensors of one context's index, tiled over a batch: rows R = B x 8."""

    def __init__(
        self, index: WaveIndex, steady_keys: torch.Tensor, steady_values: torch.Tensor, batch: int
    ) -> None:
        def tile(t: torch.Tensor) -> torch.Tensor:
            return t.repeat(batch, *([1] * (t.dim() - 1))).contiguous()

        self.batch = batch
        self.indexed = index.num_tokens
        self.steady = steady_keys.shape[1]
        self.keys = tile(torch.cat([index.keys, steady_keys], dim=1))  # [R, N + S, d]
        self.values = tile(torch.cat([index.values, steady_values], dim=1))
        self.centroids = tile(index.centroids.to(DTYPE["value"]))
        self.value_sums = tile(index.value_sums)  # float32: sums of ~16 values
        self.sizes = tile(index.sizes.to(torch.int32))
        self.offsets = tile(index.offsets.to(torch.int32))
        self.steady_ranges = (
            torch.tensor(
                [[self.indexed, self.indexed + self.steady]],
                dtype=torch.int32,
                device=self.keys.device,
            )
            .expand(self.rows, 1, 2)
            .contiguous()
        )

    @property
    def rows(self) -> int:
        return self.batch * KV_HEADS

    @property
    def tokens(self) -> int:
        return self.indexed + self.steady

    def kv_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def dense_step(layout: Layout, query: torch.Tensor) -> Callable[[], torch.Tensor]:
    q = query.view(layout.batch, KV_HEADS, GROUP, HEAD_DIM)
    k = layout.keys.view(layout.batch, KV_HEADS, layout.tokens, HEAD_DIM)
    v = layout.values.view(layout.batch, KV_HEADS, layout.tokens, HEAD_DIM)
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)


def retro_args(layout: Layout, query: torch.Tensor) -> list[torch.Tensor]:
    return [
        query,
        layout.centroids,
        layout.value_sums,
        layout.sizes,
        layout.offsets,
        layout.keys,
        layout.values,
        layout.steady_ranges,
    ]


def splits_for(rows: int, work_items: int, sms: int) -> int:
    """Enough programs to fill the GPU (~4 per SM), never more than the work items."""
    return max(1, min(work_items, math.ceil(4 * sms / rows)))


def retro_bytes(layout: Layout, budget: DecodeBudget, exact_rows: float) -> float:
    """What a step must read: all centroids, the chosen clusters' K/V rows, the steady
    zone, the estimated clusters' value sums (fp32) and logits."""
    d = HEAD_DIM
    clusters = layout.centroids.shape[1]
    per_row = (
        clusters * d * 2
        + (exact_rows + layout.steady) * d * 2 * 2
        + budget.estimation_clusters * d * 4
        + clusters * GROUP * 4
    )
    return layout.rows * per_row


class QuestPages:
    """Per 16-token page channel min/max of the keys (Quest's metadata)."""

    def __init__(self, keys: torch.Tensor) -> None:
        rows, tokens, dim = keys.shape
        pages = tokens // QUEST_PAGE
        paged = keys[:, : pages * QUEST_PAGE].view(rows, pages, QUEST_PAGE, dim)
        self.low = paged.amin(dim=2)
        self.high = paged.amax(dim=2)
        self.pages = pages

    def choose(self, query: torch.Tensor, count: int) -> torch.Tensor:
        """[R, count] page ids: Quest's upper bound sum_i max(q_i lo_i, q_i hi_i), summed
        over the GQA group."""
        q = query.to(self.low.dtype)
        bound = q.clamp(min=0) @ self.high.transpose(1, 2) + q.clamp(max=0) @ self.low.transpose(
            1, 2
        )
        return bound.float().sum(dim=1).topk(count, dim=-1).indices

    def ranges(self, page_ids: torch.Tensor) -> torch.Tensor:
        start = page_ids * QUEST_PAGE
        return torch.stack([start, start + QUEST_PAGE], dim=-1).to(torch.int32)


def gpu_resident(
    layout: Layout, budget: DecodeBudget, args: argparse.Namespace, device: torch.device, sms: int
) -> dict[str, Any]:
    generator = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(layout.rows, GROUP, HEAD_DIM, generator=generator, device=device).to(
        DTYPE["value"]
    )
    scale = HEAD_DIM**-0.5
    rows = layout.rows
    r_splits = splits_for(rows, budget.retrieval_clusters + 1, sms)
    e_splits = splits_for(rows, max(budget.estimation_clusters // 32, 1), sms)
    call_args = retro_args(layout, query)

    def retro() -> torch.Tensor:
        return tri.decode_step(
            *call_args,
            budget.retrieval_clusters,
            budget.estimation_clusters,
            scale,
            r_splits,
            e_splits,
        )

    logits = tri.centroid_logits(query, layout.centroids, layout.sizes, scale)
    r_ids, e_ids = ref.choose_clusters_ref(
        logits, budget.retrieval_clusters, budget.estimation_clusters
    )
    ranges = ref.cluster_ranges(layout.offsets, r_ids, layout.steady_ranges)
    exact_rows = float((ranges[..., 1] - ranges[..., 0]).sum(dim=1).float().mean()) - layout.steady
    partials = tri.new_partials(rows, r_splits + e_splits, GROUP, HEAD_DIM, device)
    rank = tri.cluster_rank(logits)
    chosen = rank.topk(budget.retrieval_clusters + budget.estimation_clusters, dim=-1).indices
    stages = {
        "centroid_logits": lambda: tri.centroid_logits(
            query, layout.centroids, layout.sizes, scale
        ),
        "cluster_rank (group softmax sum)": lambda: tri.cluster_rank(logits),
        "topk (torch)": lambda: rank.topk(
            budget.retrieval_clusters + budget.estimation_clusters, dim=-1
        ),
        "cluster attention (retrieval + steady)": lambda: tri.ranges_attention(
            query,
            layout.keys,
            layout.values,
            layout.steady_ranges,
            scale,
            r_splits,
            partials,
            cluster_ids=chosen[:, : budget.retrieval_clusters],
            offsets=layout.offsets,
        ),
        "estimation": lambda: tri.estimation(
            logits,
            layout.value_sums,
            layout.sizes,
            chosen[:, budget.retrieval_clusters :],
            e_splits,
            partials,
            split_offset=r_splits,
        ),
        "merge": lambda: tri.merge(*partials),
    }
    quest = QuestPages(layout.keys)
    quest_pages = max(1, math.ceil((exact_rows + layout.steady) / QUEST_PAGE))

    def quest_step() -> torch.Tensor:
        page_ranges = quest.ranges(quest.choose(query, quest_pages))
        q_splits = splits_for(rows, quest_pages, sms)
        parts = tri.ranges_attention(
            query, layout.keys, layout.values, page_ranges, scale, q_splits
        )
        return tri.merge(*parts)

    dense = dense_step(layout, query)
    reps = args.reps
    result: dict[str, Any] = {
        "rows": rows,
        "clusters": layout.centroids.shape[1],
        "retrieval_clusters": budget.retrieval_clusters,
        "estimation_clusters": budget.estimation_clusters,
        "exact_rows_mean": round(exact_rows, 1),
        "steady_rows": layout.steady,
        "splits": {"retrieval": r_splits, "estimation": e_splits},
        "dense_sdpa": summary(timed(dense, reps, device), layout.kv_bytes()),
        "retroinfer": summary(timed(retro, reps, device), retro_bytes(layout, budget, exact_rows)),
        "quest_top_pages": summary(
            timed(quest_step, reps, device),
            rows * (2 * quest.pages * HEAD_DIM * 2 + quest_pages * QUEST_PAGE * HEAD_DIM * 4),
        ),
        "quest_pages": quest_pages,
        "stages_ms": {
            name: summary(timed(fn, reps, device))["median_ms"] for name, fn in stages.items()
        },
    }
    dense_graph, retro_graph = graphed(dense, device), graphed(retro, device)
    if dense_graph is not None and retro_graph is not None:
        result["dense_sdpa_graphed"] = summary(timed(dense_graph, reps, device), layout.kv_bytes())
        result["retroinfer_graphed"] = summary(
            timed(retro_graph, reps, device), retro_bytes(layout, budget, exact_rows)
        )
    for name in ("retroinfer", "retroinfer_graphed", "quest_top_pages"):
        if name in result:
            base = result["dense_sdpa_graphed" if name.endswith("graphed") else "dense_sdpa"]
            result[name]["speedup_vs_dense"] = round(
                base["median_ms"] / result[name]["median_ms"], 3
            )
    return result


def check_against_reference(
    layout: Layout, budget: DecodeBudget, device: torch.device
) -> dict[str, float]:
    """Triton step vs torch reference on the first sequence (8 rows), per-row max error."""
    generator = torch.Generator(device=device).manual_seed(2)
    rows = KV_HEADS
    query = torch.randn(rows, GROUP, HEAD_DIM, generator=generator, device=device).to(
        DTYPE["value"]
    )
    args = [
        query,
        layout.centroids[:rows],
        layout.value_sums[:rows],
        layout.sizes[:rows],
        layout.offsets[:rows],
        layout.keys[:rows],
        layout.values[:rows],
        layout.steady_ranges[:rows],
    ]
    scale = HEAD_DIM**-0.5
    got = tri.decode_step(*args, budget.retrieval_clusters, budget.estimation_clusters, scale)
    expected = ref.decode_step_ref(
        *args, budget.retrieval_clusters, budget.estimation_clusters, scale
    )
    error = (got - expected).abs().amax(-1)
    relative = error / expected.abs().amax(-1).clamp(min=1e-6)
    return {"max_abs_error": float(error.max()), "max_rel_error_per_row": float(relative.max())}


def offload_mode(
    index: WaveIndex,
    steady_keys: torch.Tensor,
    steady_values: torch.Tensor,
    batch: int,
    budget: DecodeBudget,
    args: argparse.Namespace,
    device: torch.device,
    sms: int,
) -> dict[str, Any]:
    """Decode steps with the KV in host memory (see module docstring)."""
    layout = Layout(index, steady_keys, steady_values, batch)
    rows, scale = layout.rows, HEAD_DIM**-0.5
    tiled = WaveIndex(
        centroids=layout.centroids,
        value_sums=layout.value_sums,
        sizes=layout.sizes,
        radii=index.radii.repeat(batch, 1),
        offsets=layout.offsets.long(),
        positions=index.positions.repeat(batch, 1),
        keys=layout.keys[:, : layout.indexed],
        values=layout.values[:, : layout.indexed],
        first_position=index.first_position,
    )
    capacity_pages = math.ceil(args.cache_ratio * layout.indexed / 8)
    buffer = WaveBuffer(tiled, device, capacity_pages=capacity_pages, page_tokens=8)
    # From here on the full KV lives only in host memory (the buffer's pinned copy).
    tiled.keys = tiled.values = torch.empty(0, device=device)
    steady_k = layout.keys[:, layout.indexed :].contiguous()
    steady_v = layout.values[:, layout.indexed :].contiguous()
    steady_range = (
        torch.tensor([[0, layout.steady]], dtype=torch.int32, device=device)
        .expand(rows, 1, 2)
        .contiguous()
    )
    host_keys = layout.keys.to("cpu")
    host_values = layout.values.to("cpu")
    if device.type == "cuda":
        host_keys, host_values = host_keys.pin_memory(), host_values.pin_memory()
    quest = QuestPages(layout.keys[:, : layout.indexed])
    del layout  # the GPU copy of the full KV goes; only host copies and the index remain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    generator = torch.Generator(device=device).manual_seed(3)
    query = torch.randn(rows, GROUP, HEAD_DIM, generator=generator, device=device)
    r_splits = splits_for(rows, budget.retrieval_clusters, sms)
    e_splits = splits_for(rows, max(budget.estimation_clusters // 32, 1), sms)

    def drift() -> torch.Tensor:
        nonlocal query
        noise = torch.randn(query.shape, generator=generator, device=device)
        query = 0.95 * query + math.sqrt(1 - 0.95**2) * noise
        return query.to(DTYPE["value"])

    def retro_offload() -> torch.Tensor:
        q = drift()
        logits = tri.centroid_logits(q, tiled.centroids, tiled.sizes, scale)
        chosen = (
            tri.cluster_rank(logits)
            .topk(budget.retrieval_clusters + budget.estimation_clusters, dim=-1)
            .indices
        )
        r_ids, e_ids = (
            chosen[:, : budget.retrieval_clusters],
            chosen[:, budget.retrieval_clusters :],
        )
        batch_rows = buffer.gather(r_ids)  # host sync on the ids, misses copy async
        partials = tri.new_partials(rows, r_splits + e_splits + 1, GROUP, HEAD_DIM, device)
        # Overlapped with the copies: steady zone and estimation need no fetched rows.
        tri.ranges_attention(
            q,
            steady_k,
            steady_v,
            steady_range,
            scale,
            1,
            partials,
            split_offset=r_splits + e_splits,
        )
        tri.estimation(
            logits, tiled.value_sums, tiled.sizes, e_ids, e_splits, partials, split_offset=r_splits
        )
        batch_rows.wait()
        tri.ranges_attention(
            q, batch_rows.keys, batch_rows.values, batch_rows.ranges, scale, r_splits, partials
        )
        return tri.merge(*partials)

    device_keys = torch.empty(host_keys.shape, dtype=host_keys.dtype, device=device)
    device_values = torch.empty_like(device_keys)

    def copy_whole() -> torch.Tensor:
        q = drift()
        device_keys.copy_(host_keys, non_blocking=True)
        device_values.copy_(host_values, non_blocking=True)
        return torch.nn.functional.scaled_dot_product_attention(
            q.view(batch, KV_HEADS, GROUP, HEAD_DIM),
            device_keys.view(batch, KV_HEADS, -1, HEAD_DIM),
            device_values.view(batch, KV_HEADS, -1, HEAD_DIM),
        )

    quest_pages = max(1, math.ceil(budget.retrieval_clusters * 16 / QUEST_PAGE) + 4)
    page_rows = torch.arange(QUEST_PAGE)
    page_starts = torch.arange(quest_pages, device=device, dtype=torch.int32) * QUEST_PAGE
    page_ranges = (
        torch.stack([page_starts, page_starts + QUEST_PAGE], dim=-1)
        .unsqueeze(0)
        .expand(rows, -1, -1)
        .contiguous()
    )

    def quest_offload() -> torch.Tensor:
        q = drift()
        page_ids = quest.choose(q, quest_pages).to("cpu")
        rows_idx = (page_ids.unsqueeze(-1) * QUEST_PAGE + page_rows).reshape(rows, -1)
        flat = (rows_idx + torch.arange(rows).unsqueeze(1) * host_keys.shape[1]).reshape(-1)
        k = host_keys.view(-1, HEAD_DIM).index_select(0, flat)
        v = host_values.view(-1, HEAD_DIM).index_select(0, flat)
        if device.type == "cuda":
            k, v = k.pin_memory(), v.pin_memory()
        k = k.to(device, non_blocking=True).view(rows, -1, HEAD_DIM)
        v = v.to(device, non_blocking=True).view(rows, -1, HEAD_DIM)
        # One range per fetched page, so the splits share the work (as for RetroInfer).
        parts = tri.ranges_attention(
            q, k, v, page_ranges, scale, splits_for(rows, quest_pages, sms), block_n=16
        )
        return tri.merge(*parts)

    steps = args.offload_steps
    result: dict[str, Any] = {
        "cache_ratio": args.cache_ratio,
        "cache_pages": capacity_pages,
        "steps": steps,
    }
    for name, fn, count in (
        ("retroinfer_wave_buffer", retro_offload, steps),
        ("copy_whole_kv_then_sdpa", copy_whole, max(5, steps // 4)),
        ("quest_pages_from_host", quest_offload, steps),
    ):
        stats_before = (
            buffer.stats.cluster_hits,
            buffer.stats.cluster_misses,
            buffer.stats.bytes_host_to_device,
        )
        times = timed(fn, count, device)
        row = summary(times)
        row["tokens_per_s_attention_only_32_layers"] = round(
            batch / (LAYERS * row["median_ms"] / 1e3), 2
        )
        if name == "retroinfer_wave_buffer":
            hits = buffer.stats.cluster_hits - stats_before[0]
            misses = buffer.stats.cluster_misses - stats_before[1]
            row["cluster_hit_rate"] = round(hits / max(hits + misses, 1), 4)
            row["host_to_device_mb_per_step"] = round(
                (buffer.stats.bytes_host_to_device - stats_before[2]) / (count + 3) / 1e6, 3
            )
        result[name] = row
    base = result["retroinfer_wave_buffer"]["median_ms"]
    for name in ("copy_whole_kv_then_sdpa", "quest_pages_from_host"):
        result[name]["retroinfer_speedup"] = round(result[name]["median_ms"] / base, 3)
    result["quest_pages"] = quest_pages
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=False, help="directory for the JSON (and PNG)")
    parser.add_argument("--contexts", type=int, nargs="*", default=[131072, 524288, 1048576])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--offload-contexts", type=int, nargs="*", default=[131072])
    parser.add_argument("--offload-steps", type=int, default=20)
    parser.add_argument("--cache-ratio", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=200,
        help="start no new (context, batch) case after this many seconds (the run must "
        "stay under 4 minutes); skipped cases are listed in the JSON",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny sizes: code paths only"
    )
    parser.add_argument("--plot-only", help="draw the PNG from this JSON and stop")
    args = parser.parse_args()
    if args.plot_only:
        path = Path(args.plot_only)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    if not args.out:
        parser.error("--out is required")
    if args.smoke:
        args.contexts, args.batches, args.offload_contexts = [4096], [1, 2], [4096]
        args.reps, args.offload_steps = 2, 3
        DTYPE["value"] = torch.float16
    if args.reps < 5 and not args.smoke:
        parser.error("--reps must be >= 5")
    device = torch.device("cpu" if args.smoke else "cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else 4
    config = WaveIndexConfig()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "script": "benchmarks/retroinfer_decode.py",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": {
            "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": str(DTYPE["value"]).removeprefix("torch."),
        },
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "gpu_resident": [],
        "offload": [],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for context in sorted(set(args.contexts) | set(args.offload_contexts)):
        keys, values = random_kv(context, device, seed=context % 997)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        index = build_wave_index(keys, values, config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        build_s = time.perf_counter() - tick
        steady_rows = torch.cat(
            [
                torch.arange(config.sink_tokens),
                torch.arange(context - config.recent_tokens, context),
            ]
        )
        steady_k = keys[steady_rows.to(device)].transpose(0, 1).contiguous()
        steady_v = values[steady_rows.to(device)].transpose(0, 1).contiguous()
        del keys, values
        budget = DecodeBudget.default(index.num_clusters, config)
        print(
            f"context {context}: index {index.num_clusters} clusters/head built in "
            f"{build_s:.2f} s; budget {budget}",
            flush=True,
        )
        if context in args.contexts:
            for batch in args.batches:
                layout = None
                if time.perf_counter() - started > args.time_budget_s:
                    result["gpu_resident"].append(
                        {"context": context, "batch": batch, "skipped": "time budget"}
                    )
                    continue
                try:
                    layout = Layout(index, steady_k, steady_v, batch)
                    row = {
                        "context": context,
                        "batch": batch,
                        "index_build_s_one_sequence": round(build_s, 3),
                    }
                    row |= gpu_resident(layout, budget, args, device, sms)
                    if batch == args.batches[0]:
                        row["triton_vs_reference"] = check_against_reference(layout, budget, device)
                except torch.OutOfMemoryError as error:
                    row = {"context": context, "batch": batch, "skipped": f"OOM: {error}"[:200]}
                del layout
                result["gpu_resident"].append(row)
                print(
                    json.dumps(
                        {
                            k: row.get(k)
                            for k in (
                                "context",
                                "batch",
                                "dense_sdpa",
                                "retroinfer",
                                "retroinfer_graphed",
                                "quest_top_pages",
                                "skipped",
                            )
                        }
                    ),
                    flush=True,
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                (out_dir / "retroinfer_decode.json").write_text(json.dumps(result, indent=1))
        if context in args.offload_contexts:
            for batch in args.batches:
                row = {"context": context, "batch": batch}
                if time.perf_counter() - started > args.time_budget_s:
                    result["offload"].append(row | {"skipped": "time budget"})
                    continue
                try:
                    row |= offload_mode(index, steady_k, steady_v, batch, budget, args, device, sms)
                except torch.OutOfMemoryError as error:
                    row["skipped"] = f"OOM: {error}"[:200]
                result["offload"].append(row)
                print(json.dumps(row), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                (out_dir / "retroinfer_decode.json").write_text(json.dumps(result, indent=1))
        del index
    result["total_s"] = round(time.perf_counter() - started, 1)
    (out_dir / "retroinfer_decode.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir / "retroinfer_decode.png")
    print(f"wrote {out_dir / 'retroinfer_decode.json'} in {result['total_s']} s")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    rows = [r for r in result["gpu_resident"] if "skipped" not in r]
    labels = [f"{r['context'] // 1024}K B={r['batch']}" for r in rows]
    methods = [
        ("dense_sdpa", "dense SDPA"),
        ("dense_sdpa_graphed", "dense SDPA (graph)"),
        ("retroinfer", "RetroInfer"),
        ("retroinfer_graphed", "RetroInfer (graph)"),
        ("quest_top_pages", "Quest top pages"),
    ]
    width = 0.8 / len(methods)
    for i, (key, name) in enumerate(methods):
        values = [r.get(key, {}).get("median_ms", float("nan")) for r in rows]
        axes[0].bar([x + i * width for x in range(len(rows))], values, width, label=name)
    axes[0].set_xticks([x + 0.4 for x in range(len(rows))], labels, rotation=20)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("one decode step, one layer (ms, median)")
    axes[0].set_title("GPU-resident KV")
    axes[0].legend(fontsize=8)
    off = [r for r in result.get("offload", []) if "skipped" not in r]
    labels = [f"{r['context'] // 1024}K B={r['batch']}" for r in off]
    methods = [
        ("retroinfer_wave_buffer", "RetroInfer + wave buffer"),
        ("copy_whole_kv_then_sdpa", "copy whole KV + SDPA"),
        ("quest_pages_from_host", "Quest pages from host"),
    ]
    width = 0.8 / len(methods)
    for i, (key, name) in enumerate(methods):
        values = [r[key]["tokens_per_s_attention_only_32_layers"] for r in off]
        axes[1].bar([x + i * width for x in range(len(off))], values, width, label=name)
    axes[1].set_xticks([x + 0.27 for x in range(len(off))], labels)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("tokens/s, attention only, 32 layers")
    axes[1].set_title("KV in CPU memory")
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"RetroInfer decode, Llama-3.1-8B shape, {result['device']}, "
        f"{result['script']}, {result['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
