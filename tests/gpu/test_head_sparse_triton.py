"""The per-head Triton kernel compiled on the GPU against the torch reference (bf16/fp16,
Llama head dims, 64-token tiles), per-row error bound. The same kernel is checked on CPU by
Triton's interpreter in tests/unit/test_head_sparse_triton_interpret.py. First passed on the
H200 on 2026-12-01 (19 of 19 with the interpreter cases compiled), then moved here from
tests/gpu_minference."""

import math

import pytest
import torch

from attention_backends.kernels.paged_inputs import make_paged_prefill_batch
from attention_backends.patterns.minference import (
    AShapeHead,
    BlockSparseHead,
    LayerHeadPatterns,
    TriangleHead,
    VerticalSlashHead,
)
from tests.unit.head_sparse_same_index import (
    index_differences,
    recorded_indexes,
    reference_on_indexes,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def llama_like_layer(num_heads):
    choices = [VerticalSlashHead(256, 512), BlockSparseHead(8), AShapeHead(64, 448),
               TriangleHead(8, 256, 64)]
    return LayerHeadPatterns(tuple(choices[h % 4] for h in range(num_heads)), block_size=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,q_heads,kv_heads", [(128, 32, 8), (64, 9, 3)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_kernel_matches_reference(dtype, head_dim, q_heads, kv_heads, block_size):
    from attention_backends.kernels.head_sparse_triton import head_sparse_prefill_triton

    seed = torch.seed() % 2**31
    batch = make_paged_prefill_batch([3000, 1900, 700], [3000, 700, 700], [3000, 2500, 700],
                                     q_heads, kv_heads, head_dim, block_size, dtype=dtype,
                                     device="cuda",
                                     generator=torch.Generator().manual_seed(seed))
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_table,
            batch.query_start_loc, batch.seq_lens, batch.prompt_lens,
            llama_like_layer(q_heads), 1 / math.sqrt(head_dim))
    out = torch.full_like(batch.query, float("nan"))
    # against the reference on the index this path estimated (head_sparse_same_index says
    # why: two estimates may split a top-k tie differently)
    with recorded_indexes() as indexes:
        head_sparse_prefill_triton(*args, out=out)
    expected = reference_on_indexes(args, indexes)
    row_error = (out.double() - expected).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-12)
    assert float(row_error.max()) < 2e-2, f"seed {seed}"
    # ties aside, the estimate is the reference's (a flip costs 2 entries)
    assert index_differences(args, indexes) <= 4 * len(indexes), f"seed {seed}"


def test_sparse_prefill_sends_per_head_patterns_to_the_triton_kernel():
    """What the CUDA backend calls: ``kernels.sparse_prefill`` with a per-head pattern runs the
    Triton kernel (not the reference) and matches the reference per row."""
    from attention_backends.kernels import sparse_prefill
    from attention_backends.kernels.head_sparse_triton import head_sparse_supported

    seed = torch.seed() % 2**31
    batch = make_paged_prefill_batch([2500, 900], [2500, 400], [2500, 900], 32, 8, 128, 64,
                                     dtype=torch.bfloat16, device="cuda",
                                     generator=torch.Generator().manual_seed(seed))
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_table,
            batch.query_start_loc, batch.seq_lens, batch.prompt_lens,
            llama_like_layer(32), 1 / math.sqrt(128))
    assert head_sparse_supported(batch.query, batch.key_cache)
    with recorded_indexes() as indexes:
        out = sparse_prefill(*args, out=torch.full_like(batch.query, float("nan")))
    assert len(indexes) == 2  # the Triton path estimated both sequences
    expected = reference_on_indexes(args, indexes)
    row_error = (out.double() - expected).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-12)
    assert float(row_error.max()) < 2e-2, f"seed {seed}"
