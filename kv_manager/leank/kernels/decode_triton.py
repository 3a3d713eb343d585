"""Triton decode attention over the paged, pruned K cache, v4 (reference: decode_ref.py).

One launch per call. Grid (KV head, sequence, split); the KV head varies fastest, so the
programs that read the same pages run side by side. A program serves all ``GROUP`` query
heads of its KV head: it gathers the group's query channels once (``kept_index``), streams
its share of the sequence in ``[BLOCK_N, BLOCK_K]`` tiles of the packed K row (only kept
channels: the byte saving) and ``[BLOCK_N, head_dim]`` V tiles, several pages per tile
through the block table, with an online softmax in float32 (base 2).

Why the loop is written as it is (v3's loop, kept by v4; v2 ran at ~1.2 TB/s, 0.5x dense):

- **K loads as 16-byte async copies.** v2 took K's column start and its column mask
  (``kept < count``) as runtime values, so the compiler could not prove 16-byte alignment
  and read K with 2-byte loads; a load narrower than 4 bytes cannot be an async copy, so
  the pipeline waited on K in every iteration. The kernel now states what the layout
  guarantees (host-checked, ``kept_alignment``): every head's K offset is a multiple of
  ``KEPT_ALIGN`` (``tl.multiple_of``), and the mask is written as
  ``kept // KEPT_ALIGN < count // KEPT_ALIGN``, the same truth value but constant over
  ``KEPT_ALIGN`` columns, so it never splits a vector.
- **Page ids are loaded a tile ahead** into registers: K and V addresses then depend on no
  load of their own iteration, and the pipeliner gives both ``num_stages - 1`` buffers.
  With the page load inside the iteration, the page -> K/V address chain used up a stage
  and left one buffer (one tile in flight).
- 64-token tiles (4 pages of 16 through the block table; a pipelined loop needs a few
  iterations per program), the page size a constexpr (shifts, not divisions), and exp2
  with ``log2(e)`` folded into the scale.

v3 (the same loop, two launches: decode, then a merge kernel) lives in git history; it was
timed beside v4 (at 650e0c0) in ``benchmarks/results/leank_decode_kernel.json``. What v4
changes:

- **The split merge is folded in** (v3 merged the partials in a second launch).
  A sequence with one active split writes its output directly. Otherwise each split
  writes its partial (unnormalised output, max, sum) to the workspace, then takes a ticket
  from the (sequence, KV head) counter with an acq_rel atomic; the split that draws the
  last ticket merges every split's partial, writes the output and puts the counter back to
  zero for the next call. Ordering: ``debug_barrier`` makes every thread's partial stores
  precede the atomic (Triton issues a scalar atomic from one thread), the atomic's release
  publishes them at GPU scope, its acquire (plus the barrier Triton puts after a scalar
  atomic to broadcast the result) orders the merge's loads after every other split's
  release, and those loads bypass L1 (``.cg``), which is not coherent across SMs. The
  interpreter runs programs one after another, so there the last split in grid order
  merges; the logic does not depend on which split is last.
- **Only active splits work**: a split starting past its sequence's end returns at once
  (no partial, no ticket); the merge waits for ``cdiv(seq_len, tokens_per_split)``
  tickets, read from ``seq_lens`` on the device. Fully pruned heads: split 0 writes
  ``value_sum / seq_len`` and the rest return.
- **No allocation per call**: partials and counters live in a ``DecodeWorkspace``, cached
  per (device, head_dim, power-of-two row bucket) and never freed (a CUDA graph captured
  with one keeps pointing at it), or passed in by the caller. The counters are zero
  between calls. One workspace must not serve two streams at once.
- **Host work per call**: the launch arguments that depend only on the layout and the
  shapes (grid, split size, tables, workspace, strides, constexprs) are cached in a
  ``_Plan`` per key; a call builds the key, checks dtypes and launches once. The output may
  be passed in (``out=``, any float dtype); otherwise one float32 tensor is allocated.
  Nothing syncs: the split count comes from host-known sizes (the block table's width or
  ``max_seq_len``).

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (how the unit test checks it here).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kv_manager.leank.layout import LayerLayout

LOG2E = 1.4426950408889634


@triton.jit
def _pruned_decode_kernel(
    query,
    k_cache,
    v_cache,
    value_sum,
    block_table,
    seq_lens,
    out,
    k_counts,
    k_offsets,
    kept_index,
    v_slot,
    sum_slot,
    part_out,
    part_stats,
    tickets,
    scale_log2,
    q_heads,
    pruned_heads,
    max_blocks,
    k_block_stride,
    k_token_stride,
    v_block_stride,
    v_token_stride,
    v_head_stride,
    tokens_per_split,
    num_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PAGE: tl.constexpr,
    KEPT_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    # Splits that hold tokens: at least one, so every row gets written; at most the grid's,
    # so a sequence longer than the host's bound (a wrong max_seq_len) is cut short but
    # still draws every ticket and leaves its counter at zero.
    active = tl.minimum(tl.maximum(tl.cdiv(seq_len, tokens_per_split), 1), num_splits)
    if split < active:
        count = tl.load(k_counts + kv_head)
        dims = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + tl.arange(0, BLOCK_G)
        head_ok = tl.arange(0, BLOCK_G) < GROUP
        rows = seq * q_heads + heads  # output rows [seq, q_head]
        if count == 0:
            # Fully pruned: uniform attention, the output is the mean of V. Split 0 writes.
            if split == 0:
                slot = tl.load(sum_slot + kv_head)
                total = tl.load(value_sum + (seq * pruned_heads + slot) * HEAD_DIM + dims)
                mean = (
                    tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
                    + (total / seq_len.to(tl.float32))[None, :]
                )
                tl.store(
                    out + rows[:, None] * HEAD_DIM + dims[None, :], mean, mask=head_ok[:, None]
                )
        else:
            start = split * tokens_per_split
            stop = tl.minimum(start + tokens_per_split, seq_len)
            # Host-checked: counts and offsets are multiples of KEPT_ALIGN; saying so lets
            # the K tile load as 16-byte async copies (module docstring).
            k_start = tl.multiple_of(tl.load(k_offsets + kv_head), KEPT_ALIGN)
            v_head = tl.load(v_slot + kv_head)
            kept = tl.arange(0, BLOCK_K)
            # kept < count, written to be constant over KEPT_ALIGN columns (no split vector).
            kept_ok = (kept // KEPT_ALIGN) < (count // KEPT_ALIGN)
            channels = tl.load(kept_index + kv_head * HEAD_DIM + kept, mask=kept_ok, other=0)
            q = tl.load(
                query + heads[:, None] * HEAD_DIM + seq * q_heads * HEAD_DIM + channels[None, :],
                mask=head_ok[:, None] & kept_ok[None, :],
                other=0.0,
            )
            running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
            running_sum = tl.zeros((BLOCK_G,), tl.float32)
            acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
            table_row = block_table + seq * max_blocks
            v_base = v_cache + v_head * v_head_stride
            # Page ids one tile ahead, so K/V addresses need no load of their own iteration
            # and the pipeliner gives K and V num_stages - 1 buffers (module docstring).
            positions = start + tl.arange(0, BLOCK_N)
            next_pages = tl.load(table_row + positions // PAGE, mask=positions < stop, other=0)
            for tile in range(start, stop, BLOCK_N):
                positions = tile + tl.arange(0, BLOCK_N)
                valid = positions < stop
                pages = next_pages.to(tl.int64)
                ahead = positions + BLOCK_N
                next_pages = tl.load(table_row + ahead // PAGE, mask=ahead < stop, other=0)
                offsets = positions % PAGE
                k_rows = pages * k_block_stride + offsets * k_token_stride + k_start
                k = tl.load(
                    k_cache + k_rows[:, None] + kept[None, :],
                    mask=valid[:, None] & kept_ok[None, :],
                    other=0.0,
                )
                v_rows = pages * v_block_stride + offsets * v_token_stride
                v = tl.load(
                    v_base + v_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0
                )
                scores = _dot(q, tl.trans(k), PRECISION, DOT_IN_F32) * scale_log2
                scores = tl.where(valid[None, :], scores, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))
                correction = tl.exp2(running_max - new_max)
                weights = tl.exp2(scores - new_max[:, None])
                acc = acc * correction[:, None] + _dot(
                    weights.to(v.dtype), v, PRECISION, DOT_IN_F32
                )
                running_sum = running_sum * correction + tl.sum(weights, axis=1)
                running_max = new_max
            if active == 1:
                tl.store(
                    out + rows[:, None] * HEAD_DIM + dims[None, :],
                    acc / running_sum[:, None],
                    mask=head_ok[:, None],
                )
            else:
                part_rows = rows * num_splits + split
                tl.store(
                    part_out + part_rows[:, None] * HEAD_DIM + dims[None, :],
                    acc,
                    mask=head_ok[:, None],
                )
                tl.store(part_stats + part_rows * 2, running_max, mask=head_ok)
                tl.store(part_stats + part_rows * 2 + 1, running_sum, mask=head_ok)
                # Every thread's stores before the one thread's release.
                tl.debug_barrier()
                counter = tickets + seq * tl.num_programs(0) + kv_head
                ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                if ticket == active - 1:
                    _merge_partials(
                        part_out, part_stats, out, seq * q_heads + kv_head * GROUP,
                        active, num_splits, GROUP, HEAD_DIM, BLOCK_S,
                    )  # fmt: skip
                    tl.store(counter, 0)  # zero for the next call (stream-ordered)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, IN_F32: tl.constexpr):
    """``tl.dot``; with IN_F32 (only under the interpreter with bf16: Triton's interpreter
    computes bf16 dots wrongly, 2.6e10 off on a 16 x 16 probe) the bf16 operands are
    widened first, which is what the tensor cores compute: exact products, float32 sums."""
    if IN_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _merge_partials(
    part_out,
    part_stats,
    out,
    first_row,
    active,
    num_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Softmax-weighted sum of ``active`` splits for the group's ``GROUP`` rows, BLOCK_S
    splits at a time with a running maximum. Every active split holds tokens, so its max
    is finite; masked lanes load max -inf and weigh 0. Loads are ``.cg`` (L2, not the
    SM's L1, which another SM's stores do not update)."""
    dims = tl.arange(0, HEAD_DIM)
    for g in range(GROUP):
        row = first_row + g
        best = float("-inf")
        total = 0.0
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for first in range(0, active, BLOCK_S):
            splits = first + tl.arange(0, BLOCK_S)
            split_ok = splits < active
            stats = (row * num_splits + splits) * 2
            maxes = tl.load(
                part_stats + stats, mask=split_ok, other=float("-inf"), cache_modifier=".cg"
            )
            sums = tl.load(part_stats + stats + 1, mask=split_ok, other=0.0, cache_modifier=".cg")
            partial = tl.load(
                part_out + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                mask=split_ok[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
            new_best = tl.maximum(best, tl.max(maxes, axis=0))
            correction = tl.exp2(best - new_best)
            weight = tl.exp2(maxes - new_best)
            acc = acc * correction + tl.sum(partial * weight[:, None], axis=0)
            total = total * correction + tl.sum(sums * weight, axis=0)
            best = new_best
        tl.store(out + row * HEAD_DIM + dims, acc / total)


@dataclass(frozen=True)
class _DeviceLayout:
    """A layout's int32 tables, on the device once (not copied per call)."""

    k_counts: torch.Tensor
    k_offsets: torch.Tensor
    kept_index: torch.Tensor
    v_slot: torch.Tensor
    sum_slot: torch.Tensor
    max_kept: int
    kept_align: int  # largest power of two <= 16 dividing every head's kept count


# id(layout) -> (layout, device, tables); the layout is kept so its id cannot be reused.
_DEVICE_LAYOUTS: dict[tuple[int, str], tuple[LayerLayout, _DeviceLayout]] = {}


def kept_alignment(counts: list[int], cap: int = 16) -> int:
    """The largest power of two <= ``cap`` dividing every count (hence every K offset, a
    sum of counts). A trained mask with align 16 gives 16."""
    align = cap
    while align > 1 and any(c % align for c in counts):
        align //= 2
    return align


def device_layout(layout: LayerLayout, device: torch.device) -> _DeviceLayout:
    key = (id(layout), str(device))
    cached = _DEVICE_LAYOUTS.get(key)
    if cached is None or cached[0] is not layout:
        tables = _DeviceLayout(
            *(
                t.to(device=device, dtype=torch.int32).contiguous()
                for t in (
                    layout.k_counts,
                    layout.k_offsets,
                    layout.kept_index,
                    layout.v_slot,
                    layout.sum_slot,
                )
            ),
            max_kept=layout.max_kept,
            kept_align=kept_alignment(layout.k_counts.tolist()),
        )
        cached = _DEVICE_LAYOUTS[key] = (layout, tables)
    return cached[1]


@dataclass(frozen=True)
class DecodeWorkspace:
    """Split partials and merge counters for up to ``rows`` (sequence, query head, split)
    rows. ``tickets`` must be zero when a call starts; every call leaves it zero."""

    partials: torch.Tensor  # float32 [rows, head_dim]: unnormalised split outputs
    stats: torch.Tensor  # float32 [rows, 2]: (max, sum) per split row
    tickets: torch.Tensor  # int32 [rows]: one counter per (sequence, KV head) in use

    @classmethod
    def create(cls, rows: int, head_dim: int, device: torch.device) -> DecodeWorkspace:
        return cls(
            torch.empty(rows, head_dim, dtype=torch.float32, device=device),
            torch.empty(rows, 2, dtype=torch.float32, device=device),
            torch.zeros(rows, dtype=torch.int32, device=device),
        )

    @property
    def rows(self) -> int:
        return self.partials.shape[0]


# (device, head_dim, rows bucket) -> workspace. Never freed: a CUDA graph captured with a
# workspace keeps its pointers, so replacing it would leave the graph writing freed memory.
_WORKSPACES: dict[tuple[str, int, int], DecodeWorkspace] = {}


def workspace_for(rows: int, head_dim: int, device: torch.device) -> DecodeWorkspace:
    """The cached workspace of the smallest power-of-two bucket >= ``rows`` (>= 1,024)."""
    bucket = max(1024, triton.next_power_of_2(rows))
    key = (str(device), head_dim, bucket)
    workspace = _WORKSPACES.get(key)
    if workspace is None:
        workspace = _WORKSPACES[key] = DecodeWorkspace.create(bucket, head_dim, device)
    return workspace


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the same code
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_tokens_per_split(
    num_seqs: int,
    kv_heads: int,
    longest: int,
    block_n: int,
    device: torch.device,
    programs_per_sm: int = 4,
    min_tiles: int = 4,
    max_tiles: int = 64,
    multiprocessors: int | None = None,
) -> int:
    """Tokens per split, v4's rule: as many programs as fit on the device at once and no
    more (``programs_per_sm`` x SMs: 4 at the default 64-token tiles and 3 stages, whose
    52 KB of shared memory allow 4 per SM on Hopper), so every program starts in the first
    wave and equal programs finish together; within that, each program as long as possible
    (fewer partials to write and merge, fewer pipeline prologues). Bounds: at least
    ``min_tiles`` tiles (a pipelined loop needs a few iterations) and at most ``max_tiles``
    (a long batch then takes several waves of bounded programs, which the large shapes
    measured at 3.9-4.1 TB/s with v3). The splits of a sequence are equal to within a tile.
    v3's rule (retired; git history) asked for 8 programs per SM, i.e. two waves of short
    programs at batch 1. ``multiprocessors`` overrides the device's SM count (to tabulate
    the rule for another device)."""
    resident = programs_per_sm * (multiprocessors or _multiprocessors(device))
    splits = max(1, resident // (num_seqs * kv_heads), -(-longest // (max_tiles * block_n)))
    splits = max(1, min(splits, longest // (min_tiles * block_n)))
    return -(-longest // (splits * block_n)) * block_n


def num_splits_for(
    block_table: torch.Tensor,
    block_size: int,
    tokens_per_split: int,
    max_seq_len: int | None = None,
) -> int:
    """Splits from host-known sizes only: the longest sequence the block table can hold (or
    vLLM's host-side ``max_seq_len``), never ``seq_lens`` (a device read would sync)."""
    return max(1, -(-_longest(block_table, block_size, max_seq_len) // tokens_per_split))


def _longest(block_table: torch.Tensor, block_size: int, max_seq_len: int | None) -> int:
    return block_table.shape[1] * block_size if max_seq_len is None else max_seq_len


@dataclass(frozen=True)
class _Plan:
    """Everything a call's launch needs that the key fixes."""

    layout: LayerLayout  # kept so the ids in the key cannot be reused
    workspace: DecodeWorkspace
    grid: tuple[int, int, int]
    tail: tuple  # positional arguments after ``out``
    constexprs: dict
    fallback_sum: torch.Tensor  # float32 pointer for layouts with no pruned head


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 1024  # a key per distinct max_seq_len can pile up; past this, start over


def _plan(
    key: tuple,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    value_sum: torch.Tensor,
    block_table: torch.Tensor,
    layout: LayerLayout,
    block_n: int,
    tokens_per_split: int | None,
    max_seq_len: int | None,
    num_warps: int,
    num_stages: int,
    workspace: DecodeWorkspace | None,
) -> _Plan:
    num_seqs, q_heads, head_dim = query.shape
    device = query.device
    tables = device_layout(layout, device)
    group = q_heads // layout.num_kv_heads
    block_size = k_cache.shape[1]
    longest = _longest(block_table, block_size, max_seq_len)
    if tokens_per_split is None:
        tokens_per_split = default_tokens_per_split(
            num_seqs, layout.num_kv_heads, longest, block_n, device
        )
    tokens_per_split = -(-tokens_per_split // block_n) * block_n
    num_splits = num_splits_for(block_table, block_size, tokens_per_split, max_seq_len)
    rows = num_seqs * q_heads * num_splits  # >= num_seqs * kv_heads counters
    if workspace is None:
        workspace = workspace_for(rows, head_dim, device)
    if workspace.rows < rows or workspace.partials.shape[1] != head_dim:
        raise ValueError(f"workspace holds {workspace.rows} rows of {head_dim}; need {rows}")
    tail = (
        tables.k_counts,
        tables.k_offsets,
        tables.kept_index,
        tables.v_slot,
        tables.sum_slot,
        workspace.partials,
        workspace.stats,
        workspace.tickets,
        LOG2E / math.sqrt(head_dim),
        q_heads,
        max(value_sum.shape[1], 1),
        block_table.shape[1],
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        tokens_per_split,
        num_splits,
    )
    constexprs = {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_K": max(16, triton.next_power_of_2(max(tables.max_kept, 1))),
        "BLOCK_N": block_n,
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_S": 32,  # fixed: one compiled variant for every split count
        "PAGE": block_size,
        "KEPT_ALIGN": tables.kept_align,
        "PRECISION": "ieee" if query.dtype == torch.float32 else "tf32",
        "DOT_IN_F32": query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        "num_warps": num_warps,
        "num_stages": num_stages,
    }
    plan = _Plan(layout, workspace, (layout.num_kv_heads, num_seqs, num_splits), tail,
                 constexprs, workspace.stats)  # fmt: skip
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def paged_pruned_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    value_sum: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: LayerLayout,
    block_n: int = 64,
    tokens_per_split: int | None = None,
    max_seq_len: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """Same contract as ``decode_ref.paged_pruned_decode_ref``; returns ``out`` (float32
    [num_seqs, q_heads, head_dim] unless passed in, contiguous, any float dtype).

    ``k_cache`` [blocks, block_size, >= k_width] and ``v_cache`` [blocks, block_size,
    live_heads, head_dim] may be strided views (last dim contiguous); ``block_table`` and
    ``seq_lens`` int32 on the device; ``value_sum`` float32. ``tokens_per_split`` (None:
    ``default_tokens_per_split``) is rounded up to a multiple of ``block_n``. The first
    call for a new key (layout, shapes, strides, launch config) plans and may create the
    cached workspace: make it before capturing a CUDA graph."""
    key = (
        id(layout),
        query.device,
        query.shape,
        query.dtype,
        k_cache.shape[1],
        k_cache.stride(),
        v_cache.stride(),
        value_sum.shape[1],
        block_table.shape[1],
        max_seq_len,
        block_n,
        tokens_per_split,
        num_warps,
        num_stages,
        None if workspace is None else id(workspace),
    )
    plan = _PLANS.get(key)
    if (
        plan is None
        or plan.layout is not layout
        or (workspace is not None and plan.workspace is not workspace)
    ):
        plan = _plan(key, query, k_cache, v_cache, value_sum, block_table, layout, block_n,
                     tokens_per_split, max_seq_len, num_warps, num_stages, workspace)  # fmt: skip
    if out is None:
        out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    if not query.is_contiguous():
        query = query.contiguous()
    if block_table.dtype != torch.int32:
        block_table = block_table.to(torch.int32)
    if seq_lens.dtype != torch.int32:
        seq_lens = seq_lens.to(torch.int32)
    _pruned_decode_kernel[plan.grid](
        query,
        k_cache,
        v_cache,
        value_sum if value_sum.numel() else plan.fallback_sum,
        block_table,
        seq_lens,
        out,
        *plan.tail,
        **plan.constexprs,
    )
    return out
