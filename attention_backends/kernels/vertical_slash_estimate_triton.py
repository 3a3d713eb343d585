"""Vertical-slash scores of the last queries in Triton: ``vertical_slash.last_rows_scores``
on the GPU.

The torch estimator makes a float32 copy of every key for every query head (2 GiB at 128K
with 32 heads for 64 rows), a 1 GiB score matrix, its softmax, and a scatter-add of 268M
elements for the slashes: 12.9 ms at 128K on the H200 (minference_NOTES.md). Here, per
(query head, block of keys), two passes over the keys, read in their own dtype and upcast to
float32 in registers (exact products, float32 accumulation, as in the torch path's float32
copies):
  1. the causal row max and row sum of exp per key block (combined in torch: [H, blocks, L]);
  2. the probabilities again, their column sums stored as the vertical scores of the block's
     keys (each program owns its keys: no atomics), and each probability added to its
     diagonal's slash score with an atomic add (the torch path's scatter-add is atomic on
     CUDA too; the order of float additions differs, so scores agree to rounding, not bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per program


@triton.jit
def _scores(q_ptr, k_ptr, rows_pos, row_ok, key_start, num_tokens, stride_kt, scale,
            ROWS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
            PRECISION: tl.constexpr):
    """Scaled scores ``[ROWS, BLOCK]`` of the rows against keys ``key_start ..``, -inf where
    a key is in a row's future or past the end; also the keys' positions."""
    offs_n = key_start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < num_tokens
    k = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=key_ok[:, None], other=0.0).to(tl.float32)
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    causal = (offs_n[None, :] <= rows_pos[:, None]) & key_ok[None, :] & row_ok[:, None]
    return tl.where(causal, scores, float("-inf")), causal, offs_n


@triton.jit
def _estimate_kernel(
    q_ptr, k_ptr, positions_ptr, row_max_ptr, row_sum_ptr, vertical_ptr, slash_ptr,
    num_rows, num_tokens, num_blocks, scale, stride_qr, stride_qh, stride_kt, stride_kh,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    head = tl.program_id(0)
    block = tl.program_id(1)
    head64 = head.to(tl.int64)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_r < num_rows
    rows_pos = tl.load(positions_ptr + offs_r, mask=row_ok, other=-1)
    q_ptrs = q_ptr + offs_r[:, None] * stride_qr + head * stride_qh + offs_d[None, :]
    k_head = k_ptr + (head // GROUP) * stride_kh
    scores, causal, offs_n = _scores(q_ptrs, k_head, rows_pos, row_ok, block * BLOCK,
                                     num_tokens, stride_kt, scale, ROWS, BLOCK, HEAD_DIM,
                                     PRECISION)
    stats = (head64 * num_blocks + block) * ROWS + offs_r
    if ACCUMULATE:
        # probabilities under the combined row statistics
        row_max = tl.load(row_max_ptr + head64 * ROWS + offs_r)
        row_sum = tl.load(row_sum_ptr + head64 * ROWS + offs_r)
        probs = tl.exp(scores - tl.where(row_ok, row_max, 0.0)[:, None])
        probs = tl.where(causal, probs / tl.where(row_ok, row_sum, 1.0)[:, None], 0.0)
        tl.store(vertical_ptr + head64 * num_tokens + offs_n, tl.sum(probs, axis=0),
                 mask=offs_n < num_tokens)
        offset = rows_pos[:, None] - offs_n[None, :]  # the diagonal, >= 0 where causal
        tl.atomic_add(slash_ptr + head64 * num_tokens + offset, probs, mask=causal)
    else:
        block_max = tl.max(scores, axis=1)
        safe = tl.where(block_max == float("-inf"), 0.0, block_max)
        tl.store(row_max_ptr + stats, block_max)
        tl.store(row_sum_ptr + stats, tl.sum(tl.exp(scores - safe[:, None]), axis=1))


def last_rows_scores_triton(query: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                            heads: list[int], scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical ``[h, N]``, slash ``[h, N]``) float32 of the given query heads from the rows
    ``query [L, Hq, D]`` at ``positions [L]`` over ``keys [N, Hkv, D]``: the column sums and
    diagonal sums of ``softmax(Q K^T * scale)`` (causal), as ``vertical_slash`` defines them.
    Head dims must be powers of two >= 16; ``L <= 128``."""
    num_rows, num_q_heads, head_dim = query.shape
    num_tokens = keys.shape[0]
    rows = max(16, triton.next_power_of_2(num_rows))
    queries = query[:, heads].contiguous()  # [L, h, D]
    keys = keys.contiguous()  # the kernel assumes unit stride along D (a no-op here)
    # the KV head of each selected query head, as its own [N, h, D] view when heads are a
    # subset; the whole layer (the common case) reads keys in place with GROUP
    group = num_q_heads // keys.shape[1]
    if list(heads) == list(range(num_q_heads)):
        head_keys = keys
    else:
        head_keys = keys[:, [head // group for head in heads]]
        group = 1
    num_heads = len(heads)
    num_blocks = -(-num_tokens // BLOCK_N)
    device = query.device
    positions = positions.to(device=device, dtype=torch.int32).contiguous()
    block_max = torch.empty(num_heads, num_blocks, rows, dtype=torch.float32, device=device)
    block_sum = torch.empty_like(block_max)
    vertical = torch.empty(num_heads, num_tokens, dtype=torch.float32, device=device)
    slash = torch.zeros(num_heads, num_tokens, dtype=torch.float32, device=device)
    # Rows and keys are upcast to float32 in the kernel, so bf16, fp16 and float32 inputs
    # take the same arithmetic (the reference's float32 copies). bf16 and fp16 values are
    # exact in tf32 (7 and 10 explicit mantissa bits of its 10, and a wider exponent), so
    # half inputs keep the tensor cores; float32 inputs need true fp32 products ("ieee").
    # For sm_90 the bf16 case compiles to the same tf32
    # HGMMA as the former bf16-operand dot (checked with Triton 3.6), but Triton's
    # interpreter computed that former dot wrongly (block maxima off by 1e10 on N(0,1) data),
    # so the CPU tests could not check bf16 inputs.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"

    def launch(row_max, row_sum, accumulate):
        _estimate_kernel[(num_heads, num_blocks)](
            queries, head_keys, positions, row_max, row_sum, vertical, slash, num_rows,
            num_tokens, num_blocks, scale, queries.stride(0), queries.stride(1),
            head_keys.stride(0), head_keys.stride(1), GROUP=group, ROWS=rows, BLOCK=BLOCK_N,
            HEAD_DIM=head_dim, PRECISION=precision, ACCUMULATE=accumulate)

    launch(block_max, block_sum, False)
    row_max = block_max.max(dim=1).values  # [h, rows]; -inf only for padding rows
    safe = torch.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = (block_sum * torch.exp(block_max - safe[:, None])).sum(dim=1)
    launch(safe.contiguous(), row_sum.contiguous(), True)
    return vertical, slash
