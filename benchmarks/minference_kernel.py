"""MInference kernel speed on the GPU (issue 24): one Llama-3.1-8B-shaped attention layer.

32 query heads, 8 KV heads, d=128, bf16, batch 1, paged KV cache (64-token blocks, shuffled
physical blocks, like vLLM's GPU cache), at 128K and 256K tokens. Per layer config (one head
pattern for all 32 heads, built with ``LayerHeadPatterns`` exactly as a per-head JSON config
would):

- ``vs_512_2048``: vertical-slash (512 verticals, 2048 slashes): MInference's
  Llama-3.1-8B-Instruct ``_v2`` config, the same sizes for every head (the headline);
- ``vs_1000_6096``: vertical-slash with MInference's default for a head missing from a
  config (1000 / 6096);
- ``block_sparse_100``: block-sparse, top 100 of the 64-token key blocks (MInference's
  default);
- ``triangle``: TriangleMix's triangle as a per-head pattern (sink 8, window 512, last 128),
  and the dedicated TriangleMix kernel (``sparse_prefill_triton``) on the same input.

Timed for each: our whole call (``head_sparse_prefill_triton``: online index estimation +
plan + kernel), each of the three steps alone, FlexAttention (compiled) with the same block
mask at 128-token blocks and the same per-token ``mask_mod``, and cuDNN dense causal SDPA.
Every figure is a median of ``--reps`` (>= 5) single timed calls (CUDA events) taken in
alternation: each repetition times dense, then every config, so drift hits all alike.
Lengths after the first run only ``LONG_CONFIGS`` (the headline, block-sparse, the triangle)
and no Flex, and only when the first length's timings predict they fit ``--budget-s``;
``--grid`` then adds MMInference's grid at the first length with what is left.

Work accounting (as ``trianglemix_kernel.py``): the fraction of dense work the pattern needs,
per element (kept pairs / causal pairs, head average; rows sampled), per 64-block and per
128-block (causal tiles holding a kept pair), and the fraction our kernel computes (listed
tiles plus gathered-column groups of 64). Each ideal is the dense time scaled by that
fraction; ``pct_of_ideal_*`` = ideal / our time. Beside each time, TFLOP/s and the fraction of
the measured bf16 matmul peak (8192^3 product, measured in the same run).

TriangleMix + MInference vs MInference alone (TriangleMix's paper: +19% at 128K, end to
end): the attention time of a 32-layer model with every layer MInference (``vs_512_2048``)
against layers 0-15 MInference and 16-31 triangle (``starting_layer=16``, the official
``tri_mix_minference``), from the per-layer times measured here; MLPs are not counted.

Inputs are synthetic with the two structures the patterns exploit (``structured_qkv``), not
random: on random Q/K the estimated slashes are scattered and every pattern covers nearly
every tile. The fractions above say what the index turned out to be.

    python3 benchmarks/minference_kernel.py --out DIR [--lengths 131072 262144] [--budget-s 150]
    python3 benchmarks/minference_kernel.py --plot-only DIR/minference_kernel.json
    TRITON_INTERPRET=1 python benchmarks/minference_kernel.py --smoke --reps 2 --budget-s 900 \
        --out /tmp/mk                                   # CPU: every code path at 256/384 tokens

Needs torch and Triton only (no vLLM, no network). Writes the JSON after every length, stops
cleanly at ``--budget-s`` (or on SIGTERM) with what it has.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends.kernels.head_sparse_plan import compact, kept_tiles  # noqa: E402
from attention_backends.kernels.head_sparse_ref import attend_with_index  # noqa: E402
from attention_backends.kernels.head_sparse_triton import (  # noqa: E402
    DEFAULT_LAUNCH,
    HeadSparseLaunch,
    estimate_index,
    head_sparse_prefill_triton,
    launch_plan,
    prepare_plan,
)
from attention_backends.patterns.minference import (  # noqa: E402
    BlockSparseHead,
    HeadsIndex,
    LayerHeadPatterns,
    TriangleHead,
    VerticalSlashHead,
)
from attention_backends.patterns.mminference.grid import GridHead  # noqa: E402

JSON_NAME = "minference_kernel.json"
ROPE_THETA = 500000.0  # Llama-3.1's
DATASHEET_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, vendor datasheet (a lead)
HEADLINE = "vs_512_2048"
TRIANGLE = "triangle"
DENSE_LAYERS, NUM_LAYERS = 16, 32  # TriangleMix's starting_layer for Llama-3.1-8B
# with the bit-window mask (session 3) w4 s3 no longer compiles to w4 s2's kernel (Triton
# 3.6, triton_resources.py: s2 has 40 bytes of stack outside the loop, s3 none and deeper
# async copies), so both are swept
LAUNCH_SWEEP = {"w4 s2": HeadSparseLaunch(4, 2), "w4 s3": HeadSparseLaunch(4, 3),
                "w8 s2": HeadSparseLaunch(8, 2)}
LONG_CONFIGS = (HEADLINE, "block_sparse_100", TRIANGLE)  # lengths after the first
LONG_SETUP_S = 20.0  # a longer length's untimed part: inputs, index, fractions, warm-up
REPS_GRACE_S = 12.0  # repetitions may run this far past the budget (5 at 128K take ~8 s)
GRID_MIN_S = 20.0  # what the grid section needs at 128K (dense-like token order x 5)


@dataclass(frozen=True)
class Shape:
    q_heads: int
    kv_heads: int
    head_dim: int
    cache_block: int
    tile: int = 64  # the index's block size = the kernel's tile


LLAMA_8B = Shape(32, 8, 128, 64)
SMOKE = Shape(4, 2, 32, 32)


class OutOfTime(BaseException):
    """The budget ran out (or SIGTERM came): write what exists and stop. A BaseException,
    so the ``except Exception`` around optional parts (Flex, the dedicated kernel) lets it
    through."""


GRID = "grid_64"


def layer_configs(shape: Shape, smoke: bool, num_tokens: int | None = None
                  ) -> dict[str, LayerHeadPatterns]:
    """One pattern for every head of the layer; sizes as MInference/TriangleMix ship them
    (smoke: scaled down so each pattern still drops keys at 512 tokens). With
    ``num_tokens``, also MMInference's grid (``--grid``): a video span from token 1024 to
    1024 before the end, frames of 64 tokens (a line at every tile in token order), sinks
    64, window 256 (its synthetic-grid benchmark's shape, ``mminference_grid.py``)."""
    if smoke:
        heads = {
            HEADLINE: VerticalSlashHead(40, 100, last_q_tokens=16, sink_tokens=8,
                                        local_tokens=24),
            TRIANGLE: TriangleHead(4, 64, 32),
            "block_sparse_100": BlockSparseHead(3),
            "vs_1000_6096": VerticalSlashHead(60, 150, last_q_tokens=16, sink_tokens=8,
                                              local_tokens=24),
        }
    else:
        # in order of need: a setup past the budget drops the last ones (the headline and
        # the triangle make the TriangleMix + MInference comparison)
        heads = {
            HEADLINE: VerticalSlashHead(512, 2048),
            TRIANGLE: TriangleHead(8, 512, 128),
            "block_sparse_100": BlockSparseHead(100),
            "vs_1000_6096": VerticalSlashHead(1000, 6096),
        }
    if num_tokens is not None:
        margin = 32 if smoke else 1024
        stride = 16 if smoke else 64
        heads[GRID] = GridHead(margin, num_tokens - margin, stride, phase_q=1, phase_k=5,
                               sink_tokens=4 if smoke else 64,
                               window_tokens=16 if smoke else 256)
    return {name: LayerHeadPatterns((head,) * shape.q_heads, block_size=shape.tile)
            for name, head in heads.items()}


def structured_qkv(num_tokens: int, shape: Shape, seed: int, device: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q ``[N, Hq, D]``, K, V ``[N, Hkv, D]`` bf16 (float32 on CPU) with slash and vertical
    structure.

    Every query and key of a KV group is RoPE_pos(c + noise) with one shared direction ``c``
    of equal amplitude in every frequency pair, so ``q_i . k_j`` has a part that depends on
    ``i - j`` only: large near the diagonal and at RoPE's long-range recurrences (slashes).
    Four sink keys and one key in 512 get an extra component in the 8 lowest-frequency
    pairs, which RoPE barely rotates over 256K tokens, so every query scores them high
    (verticals). Noise 0.5 per element; V is plain noise. Probed on CPU at 128K with 8 heads
    and another seed (2026-12-01, minference_NOTES.md): ``vs_512_2048`` covers ~23% of the
    causal 64-tiles, ``vs_1000_6096`` ~44%, block-sparse ~10%.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    dims, half = shape.head_dim, shape.head_dim // 2
    group = shape.q_heads // shape.kv_heads
    inverse_freq = ROPE_THETA ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(num_tokens, dtype=torch.float64, device=device)[:, None] * inverse_freq
    cos = torch.cat([angles.cos(), angles.cos()], dim=1).float()[:, None]
    sin = torch.cat([angles.sin(), angles.sin()], dim=1).float()[:, None]

    def rope(x: torch.Tensor) -> torch.Tensor:  # Llama's rotate-half convention
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    signs = torch.where(torch.rand(shape.kv_heads, 1, generator=generator, device=device) < 0.5,
                        -1.0, 1.0)
    shared = torch.ones(shape.kv_heads, dims, device=device) * signs
    noise = 0.5
    query = noise * torch.randn(num_tokens, shape.q_heads, dims, generator=generator,
                                device=device) + shared.repeat_interleave(group, 0)[None]
    keys = noise * torch.randn(num_tokens, shape.kv_heads, dims, generator=generator,
                               device=device) + shared[None]
    lowest = torch.zeros(dims, dtype=torch.bool, device=device)
    lowest[half - 8: half] = True
    lowest[dims - 8:] = True
    heavy = torch.cat([torch.arange(4, device=device),
                       torch.randperm(num_tokens, generator=generator, device=device)
                       [: max(num_tokens // 512, 1)]])
    keys[heavy] += 4.0 * (shared * lowest)[None]
    query, keys = rope(query), rope(keys)
    values = torch.randn(num_tokens, shape.kv_heads, dims, generator=generator, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return query.to(dtype), keys.to(dtype), values.to(dtype)


def make_paged_kv(keys: torch.Tensor, values: torch.Tensor, block: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-ordered K/V ``[N, Hkv, D]`` into a shuffled paged cache (K and V halves of one
    allocation, strided views, as vLLM's); returns key_cache, value_cache, block_table."""
    num_tokens, kv_heads, dims = keys.shape
    num_blocks = num_tokens // block
    storage = torch.empty(num_blocks + 7, kv_heads, 2 * block, dims, dtype=keys.dtype,
                          device=keys.device)
    key_cache, value_cache = storage[:, :, :block], storage[:, :, block:]
    generator = torch.Generator().manual_seed(seed)
    physical = torch.randperm(num_blocks + 7, generator=generator)[:num_blocks].to(keys.device)
    key_cache[physical] = keys.view(num_blocks, block, kv_heads, dims).transpose(1, 2)
    value_cache[physical] = values.view(num_blocks, block, kv_heads, dims).transpose(1, 2)
    return key_cache, value_cache, physical.to(torch.int32).view(1, -1)


def time_ms(fn: Callable[[], object]) -> float:
    """One call, CUDA events around it (host time on CPU). Every call here takes
    milliseconds, far above launch overhead, so one event pair per sample suffices."""
    if not torch.cuda.is_available():
        started = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - started)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measured_peak_tflops(device: str) -> float:
    """bf16 matmul rate (8192^3, median of 10) on this GPU: the ceiling for fractions."""
    size = 8192 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    samples = [time_ms(lambda: a @ b) for _ in range(10)]
    return 2 * size**3 / statistics.median(samples) / 1e9


def kept_element_fraction(index: HeadsIndex) -> float:
    """Kept pairs over causal pairs, head average. Rows before the last 256 are sampled
    (<= 4096 rows, evenly strided, each standing for ``stride`` rows); the last 256 rows,
    where full rows sit, are counted exactly."""
    num_tokens = index.num_tokens
    device = index.columns.device
    tail = min(256, num_tokens)
    stride = max(1, (num_tokens - tail) // 4096)
    parts = [(torch.arange(stride // 2, num_tokens - tail, stride, device=device), stride),
             (torch.arange(num_tokens - tail, num_tokens, device=device), 1)]
    kept = torch.zeros(index.num_heads, dtype=torch.float64, device=device)
    for rows, weight in parts:
        for chunk in rows.split(128):
            if chunk.numel() == 0:  # prompts of <= 256 tokens have no sampled part
                continue
            mask = index.keep_mask(chunk, num_keys=int(chunk[-1]) + 1)
            kept += mask.sum(dim=(1, 2)).double() * weight
    return float(kept.mean()) / (num_tokens * (num_tokens + 1) / 2)


def tile_fractions(index: HeadsIndex) -> tuple[float, float, torch.Tensor]:
    """(64-block fraction, 128-block fraction, kept 128-tiles ``[H, Qt, Kt]``)."""
    num_tiles = -(-index.num_tokens // index.block_size)
    kept64 = kept_tiles(index, torch.arange(num_tiles, device=index.columns.device))
    even = num_tiles + num_tiles % 2
    padded = torch.nn.functional.pad(kept64, (0, even - num_tiles, 0, even - num_tiles))
    kept128 = padded.view(index.num_heads, even // 2, 2, even // 2, 2).any(dim=4).any(dim=2)
    causal = lambda n: n * (n + 1) / 2  # noqa: E731
    return (float(kept64.sum()) / index.num_heads / causal(num_tiles),
            float(kept128.sum()) / index.num_heads / causal(even // 2), kept128)


def computed_fraction(plan) -> float:
    """Tiles our kernel computes (listed tiles + groups of 64 gathered columns) over the
    causal tiles, head average."""
    tile_count, _, column_count, _ = plan.plan_tensors
    tiles = tile_count.sum() + ((column_count + plan.tile - 1) // plan.tile).sum()
    num_heads = tile_count.shape[0]
    causal = plan.num_tiles * (plan.num_tiles + 1) / 2
    return float(tiles) / num_heads / causal


class FlexRunner:
    """FlexAttention with a block mask given as kept 128-tiles and the index's per-token
    ``mask_mod``. One ``mask_mod`` per length reads fixed buffers that each config's index is
    copied into, so the compiled kernel is reused across configs (no recompilation)."""

    def __init__(self, num_tokens: int, shape: Shape, device: str) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        num_blocks = -(-num_tokens // shape.tile)
        flags = lambda *s: torch.zeros(*s, dtype=torch.bool, device=device)  # noqa: E731
        self.columns = flags(shape.q_heads, num_tokens)
        self.diagonals = flags(shape.q_heads, num_tokens)
        self.full_rows = flags(shape.q_heads, num_tokens)
        self.blocks = flags(shape.q_heads, num_blocks, num_blocks)
        self.num_tokens, self.tile = num_tokens, shape.tile
        columns, diagonals, full_rows, blocks, tile = (self.columns, self.diagonals,
                                                       self.full_rows, self.blocks, shape.tile)

        def mask_mod(b, h, q_idx, kv_idx):
            offset = torch.where(q_idx >= kv_idx, q_idx - kv_idx, 0)
            kept = (columns[h, kv_idx] | diagonals[h, offset] | full_rows[h, q_idx]
                    | blocks[h, q_idx // tile, kv_idx // tile])
            return (q_idx >= kv_idx) & kept

        self.mask_mod = mask_mod
        # eager on CPU (smoke): compiling needs a C++ toolchain and proves nothing there
        # static shapes: a second length must not turn this into a dynamic-shape kernel
        self.attend = (torch.compile(flex_attention, dynamic=False) if device == "cuda"
                       else flex_attention)

    def block_mask(self, index: HeadsIndex, kept128: torch.Tensor):
        from torch.nn.attention.flex_attention import BlockMask

        self.columns.copy_(index.columns)
        self.diagonals.copy_(index.diagonals)
        self.full_rows.copy_(index.full_rows)
        self.blocks.copy_(index.blocks)
        count, ids = compact(kept128)
        # full width: older torch sizes the transposed (q-block) lists by this last dim
        kv_indices = torch.zeros_like(kept128, dtype=torch.int32)
        kv_indices[..., : ids.shape[-1]] = ids.int()
        return BlockMask.from_kv_blocks(count.int()[None], kv_indices[None], BLOCK_SIZE=128,
                                        mask_mod=self.mask_mod,
                                        seq_lengths=(self.num_tokens, self.num_tokens))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def reference_row_error(out: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor, index: HeadsIndex, scale: float) -> float:
    """Worst (row, head) relative error vs the float32 torch reference on the last 128 rows
    and 128 rows mid-sequence (the whole layer in fp32 would take minutes)."""
    num_tokens = query.shape[0]
    worst = 0.0
    for first in (num_tokens // 2, num_tokens - 128):
        rows = torch.arange(max(first, 0), min(first + 128, num_tokens), device=query.device)
        expected = attend_with_index(query[rows].float(), rows, keys.float(), values.float(),
                                     index, scale).double()
        diff = (out[rows].double() - expected).norm(dim=-1)
        worst = max(worst, float((diff / expected.norm(dim=-1).clamp(min=1e-12)).max()))
    return worst


def bench_length(row: dict, shape: Shape, configs: dict[str, LayerHeadPatterns], reps: int,
                 device: str, deadline: float, sweep: bool, peak_tflops: float,
                 check_reference: bool, launch: HeadSparseLaunch,
                 with_flex: bool = True) -> HeadSparseLaunch:
    """Fill ``row`` (already in the results, so a stop midway keeps what was measured)
    for ``row["num_tokens"]``; returns the launch config used (the sweep's pick)."""
    num_tokens = row["num_tokens"]
    row["configs"] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    scale = 1 / math.sqrt(shape.head_dim)
    query, keys, values = structured_qkv(num_tokens, shape, seed=num_tokens, device=device)
    key_cache, value_cache, block_table = make_paged_kv(keys, values, shape.cache_block,
                                                        seed=num_tokens)
    ints = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    meta = (ints(0, num_tokens), ints(num_tokens), ints(num_tokens))
    out = torch.empty_like(query)
    q_bhsd = query.transpose(0, 1).unsqueeze(0).contiguous()
    k_bhsd = keys.transpose(0, 1).unsqueeze(0).contiguous()
    v_bhsd = values.transpose(0, 1).unsqueeze(0).contiguous()
    causal_pairs = num_tokens * (num_tokens + 1) / 2
    dense_flops = 4 * causal_pairs * shape.q_heads * shape.head_dim

    def dense() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q_bhsd, k_bhsd, v_bhsd, is_causal=True, enable_gqa=True)

    row["dense"] = "sdpa (cpu)"
    dense_call = dense
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # cuDNN is the fastest dense kernel here (trianglemix_NOTES.md); should it refuse a
        # length, FlashAttention-2 keeps the baseline, named in the JSON
        for label, backend in (("sdpa cudnn causal", SDPBackend.CUDNN_ATTENTION),
                               ("sdpa flash causal", SDPBackend.FLASH_ATTENTION)):
            def dense_call(backend=backend) -> torch.Tensor:
                with sdpa_kernel([backend]):
                    return dense()
            try:
                dense_call()  # warm-up (cuDNN plan)
                row["dense"] = label
                break
            except RuntimeError as error:
                row[f"dense_error_{label.split()[1]}"] = str(error)[:300]

    def e2e(patterns: LayerHeadPatterns, chosen: HeadSparseLaunch) -> torch.Tensor:
        return head_sparse_prefill_triton(query, key_cache, value_cache, block_table, *meta,
                                          patterns, scale, out=out, launch=chosen)

    if sweep:  # launch configs on the headline pattern: fastest whose output matches
        index = estimate_index(query, key_cache, block_table[0], num_tokens, num_tokens,
                               configs[HEADLINE], scale)
        plan = prepare_plan(index, 0, num_tokens, query.device)
        sweep_ms: dict[str, float | str] = {}
        first_output = None
        for label, variant in LAUNCH_SWEEP.items():
            try:
                launch_plan(plan, query, out, key_cache, value_cache, block_table[0],
                            num_tokens, scale, variant)
                if first_output is None:
                    first_output = out.clone()
                error = relative_error(out, first_output)
                if not error < 1e-2:
                    sweep_ms[label] = f"wrong: relative error {error:.2e} vs the first variant"
                    continue
                sweep_ms[label] = statistics.median(
                    time_ms(lambda v=variant: launch_plan(plan, query, out, key_cache,
                                                          value_cache, block_table[0],
                                                          num_tokens, scale, v))
                    for _ in range(5))
            except Exception as error:  # noqa: BLE001 - a variant may not fit (regs, smem)
                sweep_ms[label] = f"failed: {type(error).__name__}: {str(error)[:160]}"
            print(f"  launch sweep {label}: {sweep_ms[label]}", flush=True)
        timed = {k: v for k, v in sweep_ms.items() if isinstance(v, float)}
        if timed:
            launch = LAUNCH_SWEEP[min(timed, key=timed.get)]
        row["launch_sweep_ms"] = sweep_ms
        del index, plan, first_output
    row["launch"] = asdict(launch)

    flex = FlexRunner(num_tokens, shape, device) if with_flex else None
    callables: dict[str, dict[str, Callable[[], object]]] = {}
    for name, patterns in configs.items():
        if time.time() > deadline and callables:
            # keep the configs set up so far and time them: a setup that ran long (compiles)
            # must not cost the whole length's timings
            row["configs_skipped"] = f"budget: {list(configs)[len(callables):]}"
            break
        started = time.time()
        entry: dict = {"pattern": patterns.heads[0].name, "params": patterns.heads[0].params()}
        index = estimate_index(query, key_cache, block_table[0], num_tokens, num_tokens,
                               patterns, scale)
        plan = prepare_plan(index, 0, num_tokens, query.device)
        entry["kept_fraction_elements"] = kept_element_fraction(index)
        (entry["kept_fraction_blocks_64"], entry["kept_fraction_blocks_128"],
         kept128) = tile_fractions(index)
        entry["computed_fraction_kernel"] = computed_fraction(plan)
        tile_count, _, column_count, _ = plan.plan_tensors
        entry["tiles_per_query_tile_mean"] = float(tile_count.float().mean())
        entry["gathered_columns_per_query_tile_mean"] = float(column_count.float().mean())
        out.fill_(float("nan"))
        e2e(patterns, launch)  # compiles on first use
        entry["all_rows_written"] = not bool(torch.isnan(out).any())
        ours = out.clone()
        if check_reference:
            entry["worst_row_error_vs_fp32_reference"] = reference_row_error(
                ours, query, keys, values, index, scale)
        calls: dict[str, Callable[[], object]] = {
            "e2e": lambda p=patterns: e2e(p, launch),
            "estimate": lambda p=patterns: estimate_index(query, key_cache, block_table[0],
                                                          num_tokens, num_tokens, p, scale),
            "plan": lambda i=index: prepare_plan(i, 0, num_tokens, query.device),
            "kernel": lambda p=plan: launch_plan(p, query, out, key_cache, value_cache,
                                                 block_table[0], num_tokens, scale, launch),
        }
        try:
            if flex is None:
                raise RuntimeError("not run (with_flex=False)")
            block_mask = flex.block_mask(index, kept128)
            flex_out = flex.attend(q_bhsd, k_bhsd, v_bhsd, block_mask=block_mask,
                                   enable_gqa=True, scale=scale)
            entry["rel_err_vs_flex"] = relative_error(ours, flex_out[0].transpose(0, 1))
            del flex_out
            calls["flex"] = lambda m=block_mask: flex.attend(q_bhsd, k_bhsd, v_bhsd,
                                                             block_mask=m, enable_gqa=True,
                                                             scale=scale)
        except Exception as error:  # noqa: BLE001 - report, keep the other numbers
            entry["flex_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        if name == HEADLINE:
            # same-run A/B of session 3's changes (minference_NOTES.md): session 2's
            # byte-gather mask on the same plan, and the torch plan builder
            byte_mask = replace(launch, byte_mask=True)
            calls["kernel_byte_mask"] = lambda p=plan, b=byte_mask: launch_plan(
                p, query, out, key_cache, value_cache, block_table[0], num_tokens, scale, b)
            calls["plan_torch"] = lambda i=index: prepare_plan(i, 0, num_tokens, query.device,
                                                               device_plan=False)
            out.fill_(float("nan"))
            calls["kernel_byte_mask"]()
            entry["byte_mask_all_rows_written"] = not bool(torch.isnan(out).any())
            entry["byte_mask_rel_err_vs_ours"] = relative_error(out, ours)
        if name == GRID:  # the grid's horizontal lines packed in a rows pass (permuted)
            rows_pass = replace(launch, separate_full_rows=True)
            calls["e2e_rows_pass"] = lambda p=patterns, r=rows_pass: e2e(p, r)
            rows_plan = prepare_plan(index, 0, num_tokens, query.device, True)
            calls["kernel_rows_pass"] = lambda p=rows_plan, r=rows_pass: launch_plan(
                p, query, out, key_cache, value_cache, block_table[0], num_tokens, scale, r)
            out.fill_(float("nan"))
            e2e(patterns, rows_pass)
            entry["rows_pass_all_rows_written"] = not bool(torch.isnan(out).any())
            entry["rows_pass_rel_err_vs_token_order"] = relative_error(out, ours)
        if name == TRIANGLE and device == "cuda":
            try:
                from attention_backends.kernels.sparse_prefill_triton import (
                    sparse_prefill_triton,
                )
                from attention_backends.patterns import TrianglePattern

                head = patterns.heads[0]
                pattern = TrianglePattern(head.sink_tokens, head.window_tokens,
                                          head.last_q_tokens)
                dedicated_out = torch.empty_like(query)

                def dedicated(pattern=pattern, result=dedicated_out) -> torch.Tensor:
                    return sparse_prefill_triton(query, key_cache, value_cache, block_table,
                                                 *meta, pattern, scale, out=result)

                dedicated()
                entry["dedicated_rel_err_vs_ours"] = relative_error(dedicated_out, ours)
                calls["dedicated_trianglemix_kernel"] = dedicated
            except Exception as error:  # noqa: BLE001 - report, keep the other numbers
                entry["dedicated_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        for call in calls.values():  # warm-up: compile, caches, allocator
            call()
        callables[name] = calls
        entry["setup_s"] = round(time.time() - started, 1)
        row["configs"][name] = entry
        print(f"  {num_tokens} {name}: setup {entry['setup_s']} s, "
              f"tiles64 {entry['kept_fraction_blocks_64']:.4f}, "
              f"computed {entry['computed_fraction_kernel']:.4f}, "
              f"elements {entry['kept_fraction_elements']:.4f}", flush=True)
        del index, ours

    # alternating repetitions: dense, then every config's calls, `reps` times
    samples: dict[str, list[float]] = {"dense": []}
    for rep in range(reps):
        if time.time() > deadline + REPS_GRACE_S:
            row["incomplete"] = f"budget ran out after {rep} of {reps} repetitions"
            break
        try:
            timed = {"dense": time_ms(dense_call)}
            for name, calls in callables.items():
                for what, call in calls.items():
                    timed[f"{name}.{what}"] = time_ms(call)
        except Exception as error:  # noqa: BLE001 - keep the complete repetitions
            row["error"] = f"repetition {rep + 1}: {type(error).__name__}: {str(error)[:300]}"
            break
        for key, value in timed.items():  # only whole repetitions count
            samples.setdefault(key, []).append(value)
        first = next(iter(callables))
        print(f"  {num_tokens} rep {rep + 1}/{reps}: dense {samples['dense'][-1]:.2f} ms, "
              f"{first} {samples[f'{first}.e2e'][-1]:.2f} ms", flush=True)
    row["reps_completed"] = len(samples["dense"])
    if device == "cuda":
        row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["samples_ms"] = samples
    if not samples["dense"]:
        return launch
    median = {key: statistics.median(values) for key, values in samples.items()}
    dense_ms = median["dense"]
    row["dense_ms"] = dense_ms
    row["dense_tflops"] = dense_flops / dense_ms / 1e9
    row["dense_pct_of_peak"] = 100 * row["dense_tflops"] / peak_tflops
    for name, entry in row["configs"].items():
        for what in callables[name]:
            entry[f"{what}_ms"] = median[f"{name}.{what}"]
        kept_flops = dense_flops * entry["kept_fraction_elements"]
        computed_flops = dense_flops * entry["computed_fraction_kernel"]
        for what in ("e2e", "kernel"):
            ms = entry[f"{what}_ms"]
            for ideal in ("elements", "blocks_64", "blocks_128"):
                entry[f"ideal_ms_{ideal}"] = dense_ms * entry[f"kept_fraction_{ideal}"]
                entry[f"{what}_pct_of_ideal_{ideal}"] = 100 * entry[f"ideal_ms_{ideal}"] / ms
            entry[f"{what}_speedup_vs_dense"] = dense_ms / ms
            entry[f"{what}_tflops_kept"] = kept_flops / ms / 1e9
            entry[f"{what}_pct_of_peak_kept"] = 100 * entry[f"{what}_tflops_kept"] / peak_tflops
        # "80% of the ideal for the blocks it computes": dense time scaled by what we compute
        entry["ideal_ms_computed"] = dense_ms * entry["computed_fraction_kernel"]
        entry["kernel_pct_of_ideal_computed"] = (100 * entry["ideal_ms_computed"]
                                                 / entry["kernel_ms"])
        entry["kernel_tflops_computed"] = computed_flops / entry["kernel_ms"] / 1e9
        entry["kernel_pct_of_peak_computed"] = 100 * entry["kernel_tflops_computed"] / peak_tflops
        if "flex_ms" in entry:
            entry["flex_tflops_kept"] = kept_flops / entry["flex_ms"] / 1e9
            entry["flex_pct_of_peak_kept"] = 100 * entry["flex_tflops_kept"] / peak_tflops
            entry["kernel_speedup_vs_flex"] = entry["flex_ms"] / entry["kernel_ms"]
            # Flex needs the same index: give it our estimation time too
            entry["e2e_speedup_vs_flex_plus_estimate"] = (
                (entry["flex_ms"] + entry["estimate_ms"]) / entry["e2e_ms"])
    row["combination"] = combination(row["configs"])
    return launch


def combination(configs: dict) -> dict:
    """Attention time of a 32-layer model: MInference in every layer vs MInference in layers
    0-15 and the triangle in 16-31 (TriangleMix's paper: +19% end to end at 128K)."""
    result: dict = {"layers": NUM_LAYERS, "minference_layers_in_mix": DENSE_LAYERS}
    minference = configs.get(HEADLINE, {}).get("e2e_ms")
    triangle = configs.get(TRIANGLE, {})
    if minference is None:
        return result
    alone = NUM_LAYERS * minference
    result["minference_alone_ms"] = alone
    for label, key in (("per_head_triangle", "e2e_ms"),
                       ("dedicated_triangle_kernel", "dedicated_trianglemix_kernel_ms")):
        if key in triangle:
            mixed = DENSE_LAYERS * minference + (NUM_LAYERS - DENSE_LAYERS) * triangle[key]
            result[f"trianglemix_plus_minference_ms_{label}"] = mixed
            result[f"speedup_pct_{label}"] = 100 * (alone / mixed - 1)
    return result


def write(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JSON_NAME
    path.write_text(json.dumps(results, indent=1))
    return path


def tokens_label(num_tokens: int) -> str:
    return f"{num_tokens // 1024}K" if num_tokens % 1024 == 0 else str(num_tokens)


def summary_table(results: dict) -> str:
    lines = [f"{'len':>5} {'config':<17} {'e2e':>8} {'est':>7} {'plan':>7} {'kernel':>8} "
             f"{'flex':>8} {'dense':>8} {'x flex':>6} {'%id128':>6} {'%idcmp':>6} {'%peak':>5}"]
    for row in results.get("lengths", []) + ([results["grid"]] if "grid" in results else []):
        for name, entry in row.get("configs", {}).items():
            if "e2e_ms" not in entry:
                continue
            lines.append(
                f"{tokens_label(row['num_tokens']):>5} {name:<17} {entry['e2e_ms']:8.2f} "
                f"{entry['estimate_ms']:7.2f} {entry['plan_ms']:7.2f} {entry['kernel_ms']:8.2f} "
                f"{entry.get('flex_ms', float('nan')):8.2f} {row['dense_ms']:8.2f} "
                f"{entry.get('kernel_speedup_vs_flex', float('nan')):6.2f} "
                f"{entry['kernel_pct_of_ideal_blocks_128']:6.1f} "
                f"{entry['kernel_pct_of_ideal_computed']:6.1f} "
                f"{entry['kernel_pct_of_peak_computed']:5.1f}")
            if "e2e_rows_pass_ms" in entry:
                lines.append(f"{'':>6}{'(rows pass: e2e / kernel)':<35}"
                             f"{entry['e2e_rows_pass_ms']:8.2f} "
                             f"{entry['kernel_rows_pass_ms']:8.2f}")
            if "dedicated_trianglemix_kernel_ms" in entry:
                lines.append(f"{'':>6}{'(dedicated TriangleMix kernel)':<35}"
                             f"{entry['dedicated_trianglemix_kernel_ms']:8.2f}")
            if "kernel_byte_mask_ms" in entry:
                lines.append(f"{'':>6}{'(A/B: byte-mask kernel / torch plan)':<35}"
                             f"{entry['kernel_byte_mask_ms']:8.2f} {entry['plan_torch_ms']:8.2f}")
        combo = row.get("combination", {})
        for label in ("per_head_triangle", "dedicated_triangle_kernel"):
            if f"speedup_pct_{label}" in combo:
                lines.append(f"{'':>6}TriangleMix+MInference vs MInference ({label}): "
                             f"{combo[f'speedup_pct_{label}']:+.1f}% attention time")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results.get("lengths", []) if row.get("dense_ms")]
    if not rows:
        return
    figure, axes = plt.subplots(1, len(rows) + 1, figsize=(6 * len(rows) + 5, 4.8))
    for ax, row in zip(axes[:-1], rows, strict=False):
        names = [n for n, e in row["configs"].items() if "e2e_ms" in e]
        xs = range(len(names))
        bottom = [0.0] * len(names)
        for part, color in (("estimate_ms", "tab:orange"), ("plan_ms", "tab:olive"),
                            ("kernel_ms", "tab:blue")):
            heights = [row["configs"][n][part] for n in names]
            ax.bar([x - 0.2 for x in xs], heights, 0.4, bottom=bottom, color=color,
                   label=f"ours: {part[:-3]}")
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.bar([x + 0.2 for x in xs], [row["configs"][n].get("flex_ms", 0) for n in names], 0.4,
               color="tab:red", label="FlexAttention, same block mask")
        ax.scatter([x - 0.2 for x in xs],
                   [row["configs"][n]["ideal_ms_blocks_128"] for n in names], marker="_",
                   s=600, color="black", label="ideal: dense x 128-block fraction", zorder=3)
        ax.axhline(row["dense_ms"], color="gray", linestyle="--", label="cuDNN dense")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [n.replace("_", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel("ms, one layer (log)")
        ax.set_title(f"{tokens_label(row['num_tokens'])} tokens, Llama-3.1-8B layer, bf16")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for name in rows[0]["configs"]:
        points = [(row["num_tokens"] / 1024, row["configs"][name])
                  for row in rows if "kernel_ms" in row["configs"].get(name, {})]
        ax.plot([p[0] for p in points], [p[1]["kernel_pct_of_ideal_computed"] for p in points],
                "o-", label=f"{name}: % of ideal (computed tiles)")
    ax.axhline(80, color="gray", linestyle=":", label="target 80%")
    ax.set_xlabel("K tokens")
    ax.set_ylabel("% of ideal")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=7)
    ax.set_title("kernel vs dense x fraction it computes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (>= 5)")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="stop starting new work after this many seconds")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch sweep")
    parser.add_argument("--tests-log", help="pytest output to record in the JSON")
    parser.add_argument("--grid", action="store_true",
                        help="last, with the budget left: MMInference's grid at the first "
                             "length, token order vs the rows pass, vs dense (no Flex)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, CPU (run with TRITON_INTERPRET=1): code paths only")
    parser.add_argument("--plot-only", metavar="JSON", help="draw the PNG beside a JSON")
    args = parser.parse_args()
    if args.plot_only:
        path = Path(args.plot_only)
        results = json.loads(path.read_text())
        plot(results, path.with_suffix(".png"))
        print(summary_table(results))
        return
    if args.reps < 5 and not args.smoke:  # the smoke run checks code paths, not times
        parser.error("--reps must be >= 5")
    started = time.time()
    deadline = started + args.budget_s

    def on_term(signum, frame):  # `timeout` sends SIGTERM: keep what exists
        raise OutOfTime(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    import triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SMOKE if args.smoke else LLAMA_8B
    lengths = [256, 384] if args.smoke else args.lengths
    configs = layer_configs(shape, args.smoke)
    out_dir = Path(args.out)
    results: dict = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shape": asdict(shape), "dtype": "bf16" if device == "cuda" else "float32",
        "configs": {name: {"pattern": p.heads[0].name, "params": p.heads[0].params()}
                    for name, p in configs.items()},
        "inputs": "structured_qkv: RoPE'd shared direction (slashes) + heavy low-frequency "
                  "keys (verticals), noise 0.5; see the docstring",
        "kv_cache": f"paged, block {shape.cache_block}, shuffled physical blocks",
        "timing": f"median of {args.reps} single calls (CUDA events), dense and every "
                  "config alternating in each repetition",
        "lengths": [],
    }
    if args.tests_log and Path(args.tests_log).exists():
        lines = Path(args.tests_log).read_text().strip().splitlines()
        results["gpu_tests"] = {"summary": lines[-1] if lines else "",
                                "failures": [x for x in lines if x.startswith(("FAILED", "ERROR"))]}
    launch = DEFAULT_LAUNCH
    try:
        results["peak_bf16_tflops_measured"] = measured_peak_tflops(device)
        results["peak_bf16_tflops_datasheet"] = DATASHEET_PEAK_TFLOPS
        print(f"peak bf16 {results['peak_bf16_tflops_measured']:.0f} TFLOP/s", flush=True)
        timed_s_per_config: dict[str, float] = {}  # first length, per rep, no Flex
        failed = False
        for position, num_tokens in enumerate(lengths):
            length_configs = configs
            if position > 0:
                # longer lengths: the configs the comparisons need, no Flex (its recompile
                # for a new shape alone takes tens of seconds; the x-Flex target is at 128K)
                length_configs = {n: p for n, p in configs.items() if n in LONG_CONFIGS}
                ratio = (num_tokens / lengths[0]) ** 2
                per_rep = timed_s_per_config.get("dense", 0.0) + sum(
                    timed_s_per_config.get(n, 0.0) for n in length_configs)
                predicted = LONG_SETUP_S + ratio * per_rep * args.reps
                if time.time() + predicted > deadline:
                    results["lengths"].append({"num_tokens": num_tokens, "skipped":
                                               f"predicted {predicted:.0f} s, budget left "
                                               f"{deadline - time.time():.0f} s"})
                    print(f"skip {num_tokens}: predicted {predicted:.0f} s", flush=True)
                    continue
            length_started = time.time()
            print(f"length {num_tokens}", flush=True)
            row: dict = {"num_tokens": num_tokens}
            results["lengths"].append(row)
            try:
                launch = bench_length(
                    row, shape, length_configs, args.reps, device, deadline,
                    sweep=position == 0 and not args.no_sweep,
                    peak_tflops=results["peak_bf16_tflops_measured"],
                    check_reference=num_tokens <= 131072, launch=launch,
                    with_flex=position == 0)
            except torch.cuda.OutOfMemoryError as error:
                row["error"] = f"out of memory: {str(error)[:200]}"
            except Exception as error:  # noqa: BLE001 - a CUDA error poisons the context
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                write(results, out_dir)
                print(f"length {num_tokens} failed: {row['error']}", flush=True)
                failed = True
                break
            if position == 0:  # median seconds per repetition, by config, without Flex
                for key, values in row.get("samples_ms", {}).items():
                    name = key.split(".")[0]
                    if not key.endswith(".flex"):
                        timed_s_per_config[name] = (timed_s_per_config.get(name, 0.0)
                                                    + statistics.median(values) / 1000)
            write(results, out_dir)
            print(f"length {num_tokens} done in {time.time() - length_started:.0f} s",
                  flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
        if args.grid and not failed and time.time() + GRID_MIN_S < deadline:
            # last, with what is left: the MInference rows are on disk whatever happens here
            num_tokens = lengths[0]
            grid_row: dict = {"num_tokens": num_tokens, "grid_only": True}
            results["grid"] = grid_row
            print(f"grid at {num_tokens}", flush=True)
            try:
                bench_length(grid_row, shape,
                             {GRID: layer_configs(shape, args.smoke, num_tokens)[GRID]},
                             args.reps, device, deadline, sweep=False,
                             peak_tflops=results["peak_bf16_tflops_measured"],
                             check_reference=num_tokens <= 131072, launch=launch,
                             with_flex=False)
            except Exception as error:  # noqa: BLE001 - keep the MInference rows
                grid_row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        elif args.grid:
            results["grid"] = {"skipped": f"budget left {deadline - time.time():.0f} s < "
                                          f"{GRID_MIN_S} s"}
    except OutOfTime as stop:
        results["stopped"] = f"out of time: {stop}"
        print(f"stopped: {stop}", flush=True)
    results["wall_s"] = round(time.time() - started, 1)
    path = write(results, out_dir)
    try:
        plot(results, path.with_suffix(".png"))
    except Exception as error:  # noqa: BLE001 - the JSON is what matters; say why no PNG
        print(f"no plot: {type(error).__name__}: {error}", flush=True)
    print(summary_table(results))
    print(f"wrote {path} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
