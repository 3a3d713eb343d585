"""Triton kernels for RetroInfer's GPU decode step (torch reference: decode_ref.py).

One decode step for rows R = sequences x KV heads, G query heads per row:
1. ``centroid_logits``: [R, G, C] scaled q.c (grid R x cluster blocks; the G query heads of a
   row share each centroid tile, so centroids are read once per GQA group).
2. cluster choice: softmax + group sum + top-k in torch (small: R x C floats).
3. ``ranges_attention``: exact attention over row ranges (retrieval clusters + the steady zone;
   Quest pages too), split-KV: grid R x splits, each split walks its share of the ranges in
   BLOCK_N tiles with an online softmax, GQA group together; writes partial (out, lse).
4. ``estimation``: the estimated clusters' partial from the step-1 logits (gathered, no second
   q.c), the log sizes and the value sums.
5. ``merge``: log-sum-exp merge of all partials (grid R x G).

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (unit tests) and natively on CUDA
(tests/gpu/test_retroinfer_gpu.py, benchmarks/retroinfer_decode.py). Written for Triton 3.6
(GPU host) and checked here with the installed Triton under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs (interpreter tests) must not round through tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _centroid_logits_kernel(
    query,
    centroids,
    sizes,
    out,
    scale,
    G,
    C,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    clusters = block * BLOCK_C + tl.arange(0, BLOCK_C)
    head_ok = heads < G
    cluster_ok = clusters < C
    cent = tl.load(
        centroids + (row * C + clusters)[:, None] * HEAD_DIM + dims[None, :],
        mask=cluster_ok[:, None],
        other=0.0,
    )
    q = tl.load(
        query + (row * G + heads)[:, None] * HEAD_DIM + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    ).to(cent.dtype)
    logits = tl.dot(q, tl.trans(cent), input_precision=PRECISION) * scale
    size = tl.load(sizes + row * C + clusters, mask=cluster_ok, other=0)
    logits = tl.where(size[None, :] > 0, logits, float("-inf"))
    tl.store(
        out + (row * G + heads)[:, None] * C + clusters[None, :],
        logits,
        mask=head_ok[:, None] & cluster_ok[None, :],
    )


@triton.jit
def _ranges_attention_kernel(
    query,
    keys,
    values,
    cluster_ids,
    ids_stride,
    n_ids,
    offsets,
    offsets_stride,
    ranges,
    part_out,
    part_lse,
    scale,
    G,
    N,
    n_ranges,
    ranges_per_split,
    total_splits,
    split_offset,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    head_ok = heads < G
    q = tl.load(
        query + (row * G + heads)[:, None] * HEAD_DIM + dims[None, :],
        mask=head_ok[:, None],
        other=0.0,
    ).to(keys.dtype.element_ty)
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    # Items 0 .. n_ids-1 are clusters (row range from offsets), the rest explicit ranges.
    first = split * ranges_per_split
    last = tl.minimum(first + ranges_per_split, n_ids + n_ranges)
    for item in range(first, last):
        if item < n_ids:
            cluster = tl.load(cluster_ids + row * ids_stride + item)
            start = tl.load(offsets + row * offsets_stride + cluster).to(tl.int32)
            end = tl.load(offsets + row * offsets_stride + cluster + 1).to(tl.int32)
        else:
            extra = item - n_ids
            start = tl.load(ranges + (row * n_ranges + extra) * 2).to(tl.int32)
            end = tl.load(ranges + (row * n_ranges + extra) * 2 + 1).to(tl.int32)
        for tile in range(start, end, BLOCK_N):
            rows = tile + tl.arange(0, BLOCK_N)
            valid = rows < end
            offs = (row * N + rows)[:, None] * HEAD_DIM + dims[None, :]
            k = tl.load(keys + offs, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            alpha = tl.exp(running_max - safe_max)
            probs = tl.exp(scores - safe_max[:, None])
            v = tl.load(values + offs, mask=valid[:, None], other=0.0)
            running_sum = running_sum * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
            running_max = new_max
    nonempty = running_sum > 0
    out = acc / tl.where(nonempty, running_sum, 1.0)[:, None]
    lse = tl.where(
        nonempty, running_max + tl.log(tl.where(nonempty, running_sum, 1.0)), float("-inf")
    )
    part = (row * total_splits + split_offset + split) * G + heads
    tl.store(part_out + part[:, None] * HEAD_DIM + dims[None, :], out, mask=head_ok[:, None])
    tl.store(part_lse + part, lse, mask=head_ok)


@triton.jit
def _estimation_kernel(
    logits,
    value_sums,
    sizes,
    cluster_ids,
    ids_stride,
    part_out,
    part_lse,
    G,
    C,
    E,
    per_split,
    total_splits,
    split_offset,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    head_ok = heads < G
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    first = split * per_split
    last = tl.minimum(first + per_split, E)
    for tile in range(first, last, BLOCK_E):
        slots = tile + tl.arange(0, BLOCK_E)
        valid = slots < last
        ids = tl.load(cluster_ids + row * ids_stride + slots, mask=valid, other=0).to(tl.int64)
        size = tl.load(sizes + row * C + ids, mask=valid, other=0).to(tl.float32)
        ok = valid & (size > 0)
        scores = tl.load(
            logits + (row * G + heads)[:, None] * C + ids[None, :],
            mask=head_ok[:, None] & ok[None, :],
            other=float("-inf"),
        )
        scores = tl.where(ok[None, :], scores, float("-inf"))
        # Cluster c counts |c| times in the mass, and its numerator is exp(s_c) * V_c.
        weighted = scores + tl.log(tl.where(ok, size, 1.0))[None, :]
        new_max = tl.maximum(running_max, tl.max(weighted, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(running_max - safe_max)
        running_sum = running_sum * alpha + tl.sum(tl.exp(weighted - safe_max[:, None]), 1)
        vsum = tl.load(
            value_sums + (row * C + ids)[:, None] * HEAD_DIM + dims[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        probs = tl.exp(scores - safe_max[:, None]).to(vsum.dtype)
        acc = acc * alpha[:, None] + tl.dot(probs, vsum, input_precision=PRECISION)
        running_max = new_max
    nonempty = running_sum > 0
    out = acc / tl.where(nonempty, running_sum, 1.0)[:, None]
    lse = tl.where(
        nonempty, running_max + tl.log(tl.where(nonempty, running_sum, 1.0)), float("-inf")
    )
    part = (row * total_splits + split_offset + split) * G + heads
    tl.store(part_out + part[:, None] * HEAD_DIM + dims[None, :], out, mask=head_ok[:, None])
    tl.store(part_lse + part, lse, mask=head_ok)


@triton.jit
def _rank_kernel(logits, rank, G, C, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # rank[c] = sum over the GQA group of softmax_c(logits[g]): two passes over the row
    # (log-sum-exp per query head, then the sum), one program per row.
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_G)
    head_ok = heads < G
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    for first in range(0, C, BLOCK_C):
        clusters = first + tl.arange(0, BLOCK_C)
        x = tl.load(
            logits + (row * G + heads)[:, None] * C + clusters[None, :],
            mask=head_ok[:, None] & (clusters < C)[None, :],
            other=float("-inf"),
        )
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
            tl.exp(x - safe_max[:, None]), axis=1
        )
        running_max = new_max
    # Padding heads (and a head whose clusters are all empty) get lse = +inf: weight 0.
    lse = tl.where(running_sum > 0, running_max + tl.log(running_sum), float("inf"))
    for first in range(0, C, BLOCK_C):
        clusters = first + tl.arange(0, BLOCK_C)
        x = tl.load(
            logits + (row * G + heads)[:, None] * C + clusters[None, :],
            mask=head_ok[:, None] & (clusters < C)[None, :],
            other=float("-inf"),
        )
        total = tl.sum(tl.exp(x - lse[:, None]), axis=0)
        tl.store(rank + row * C + clusters, total, mask=clusters < C)


@triton.jit
def _merge_kernel(part_out, part_lse, out, S, G, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    split_ok = splits < S
    lse = tl.load(part_lse + (row * S + splits) * G + head, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse - safe_top)
    parts = tl.load(
        part_out + ((row * S + splits) * G + head)[:, None] * HEAD_DIM + dims[None, :],
        mask=split_ok[:, None],
        other=0.0,
    )
    total = tl.sum(weight, axis=0)
    merged = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out + (row * G + head) * HEAD_DIM + dims, merged)


def _require_contiguous(**tensors: torch.Tensor) -> None:
    # The kernels index rows with plain strides; a silent .contiguous() would hide a copy
    # of a gigabyte-sized cache in every step, so refuse instead.
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _block_g(groups: int) -> int:
    return max(16, triton.next_power_of_2(groups))  # tl.dot needs >= 16 rows


def centroid_logits(
    query: torch.Tensor,
    centroids: torch.Tensor,
    sizes: torch.Tensor,
    scale: float,
    block_c: int = 64,
) -> torch.Tensor:
    _require_contiguous(query=query, centroids=centroids, sizes=sizes)
    rows, groups, dim = query.shape
    clusters = centroids.shape[1]
    out = torch.empty(rows, groups, clusters, dtype=torch.float32, device=query.device)
    _centroid_logits_kernel[(rows, triton.cdiv(clusters, block_c))](
        query,
        centroids,
        sizes,
        out,
        scale,
        groups,
        clusters,
        HEAD_DIM=dim,
        BLOCK_G=_block_g(groups),
        BLOCK_C=block_c,
        PRECISION=_precision(centroids.dtype),
    )
    return out


def new_partials(
    rows: int, splits: int, groups: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial buffers [R, S, G, d] and [R, S, G] that several kernels fill side by side."""
    return (
        torch.empty(rows, splits, groups, dim, dtype=torch.float32, device=device),
        torch.empty(rows, splits, groups, dtype=torch.float32, device=device),
    )


def ranges_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    ranges: torch.Tensor,
    scale: float,
    splits: int,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
    split_offset: int = 0,
    block_n: int = 16,
    cluster_ids: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``splits`` partials (from ``split_offset``) with exact attention over the rows of
    the clusters ``cluster_ids`` [R, n] (ranges from ``offsets`` [R, C + 1], read inside the
    kernel: no torch gathers per step), then over the explicit ``ranges`` [R, e, 2]."""
    _require_contiguous(query=query, keys=keys, values=values, ranges=ranges)
    rows, groups, dim = query.shape
    part_out, part_lse = partials or new_partials(rows, splits, groups, dim, query.device)
    n_ranges = ranges.shape[1]
    if cluster_ids is None or offsets is None:
        cluster_ids, offsets, n_ids = ranges, ranges, 0  # never read
        ids_stride = offsets_stride = 0
    else:
        if cluster_ids.stride(-1) != 1 or not offsets.is_contiguous():
            raise ValueError("cluster_ids rows and offsets must be contiguous")
        n_ids, ids_stride, offsets_stride = (
            cluster_ids.shape[1],
            cluster_ids.stride(0),
            offsets.shape[1],
        )
    per_split = triton.cdiv(max(n_ids + n_ranges, 1), splits)
    _ranges_attention_kernel[(rows, splits)](
        query,
        keys,
        values,
        cluster_ids,
        ids_stride,
        n_ids,
        offsets,
        offsets_stride,
        ranges,
        part_out,
        part_lse,
        scale,
        groups,
        keys.shape[1],
        n_ranges,
        per_split,
        part_out.shape[1],
        split_offset,
        HEAD_DIM=dim,
        BLOCK_G=_block_g(groups),
        BLOCK_N=block_n,
        PRECISION=_precision(keys.dtype),
    )
    return part_out, part_lse


def cluster_rank(logits: torch.Tensor, block_c: int = 256) -> torch.Tensor:
    """[R, C] float32: the GQA group's summed softmax over clusters (ranking score)."""
    _require_contiguous(logits=logits)
    rows, groups, clusters = logits.shape
    rank = torch.empty(rows, clusters, dtype=torch.float32, device=logits.device)
    _rank_kernel[(rows,)](logits, rank, groups, clusters, BLOCK_G=_block_g(groups), BLOCK_C=block_c)
    return rank


def estimation(
    logits: torch.Tensor,
    value_sums: torch.Tensor,
    sizes: torch.Tensor,
    cluster_ids: torch.Tensor,
    splits: int,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
    split_offset: int = 0,
    block_e: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_contiguous(logits=logits, value_sums=value_sums, sizes=sizes)
    if cluster_ids.stride(-1) != 1:
        raise ValueError("cluster_ids rows must be contiguous")
    rows, groups, clusters = logits.shape
    dim = value_sums.shape[-1]
    part_out, part_lse = partials or new_partials(rows, splits, groups, dim, logits.device)
    count = cluster_ids.shape[1]
    per_split = triton.cdiv(max(count, 1), splits)
    _estimation_kernel[(rows, splits)](
        logits,
        value_sums,
        sizes,
        cluster_ids,
        cluster_ids.stride(0),
        part_out,
        part_lse,
        groups,
        clusters,
        count,
        per_split,
        part_out.shape[1],
        split_offset,
        HEAD_DIM=dim,
        BLOCK_G=_block_g(groups),
        BLOCK_E=block_e,
        PRECISION=_precision(value_sums.dtype),
    )
    return part_out, part_lse


def merge(part_out: torch.Tensor, part_lse: torch.Tensor) -> torch.Tensor:
    _require_contiguous(part_out=part_out, part_lse=part_lse)
    rows, splits, groups, dim = part_out.shape
    out = torch.empty(rows, groups, dim, dtype=torch.float32, device=part_out.device)
    _merge_kernel[(rows, groups)](
        part_out,
        part_lse,
        out,
        splits,
        groups,
        HEAD_DIM=dim,
        BLOCK_S=triton.next_power_of_2(splits),
    )
    return out


def decode_step(
    query: torch.Tensor,
    centroids: torch.Tensor,
    value_sums: torch.Tensor,
    sizes: torch.Tensor,
    offsets: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    steady_ranges: torch.Tensor,
    retrieval: int,
    estimation_count: int,
    scale: float,
    retrieval_splits: int = 8,
    estimation_splits: int = 4,
) -> torch.Tensor:
    """One RetroInfer decode step on the device (same contract as decode_ref.decode_step_ref).
    Returns [R, G, d] float32. Launches: logits, rank, top-k, attention, estimation, merge."""
    rows, groups, dim = query.shape
    logits = centroid_logits(query, centroids, sizes, scale)
    chosen = cluster_rank(logits).topk(retrieval + estimation_count, dim=-1).indices
    splits = retrieval_splits + (estimation_splits if estimation_count else 0)
    partials = new_partials(rows, splits, groups, dim, query.device)
    ranges_attention(
        query,
        keys,
        values,
        steady_ranges,
        scale,
        retrieval_splits,
        partials,
        cluster_ids=chosen[:, :retrieval],
        offsets=offsets,
    )
    if estimation_count:
        estimation(
            logits,
            value_sums,
            sizes,
            chosen[:, retrieval:],
            estimation_splits,
            partials,
            split_offset=retrieval_splits,
        )
    return merge(*partials)
