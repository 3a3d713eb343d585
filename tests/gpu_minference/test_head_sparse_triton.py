"""The per-head Triton kernel compiled on the GPU against the torch reference (bf16/fp16,
Llama head dims, 64-token tiles). The same kernel is checked on CPU by Triton's interpreter
in tests/unit/test_head_sparse_triton_interpret.py; this file has not run on a GPU yet.

Kept out of tests/gpu until it has passed once: the GPU scripts run all of tests/gpu (with
a time limit) before their benchmarks, and an unproven kernel should not stall them. Run
``pytest -m gpu tests/gpu_minference tests/unit/head_sparse_triton_cases.py`` on the device."""

import math

import pytest
import torch

from attention_backends.kernels.head_sparse_ref import head_sparse_prefill_ref
from attention_backends.kernels.paged_inputs import make_paged_prefill_batch
from attention_backends.patterns.minference import (
    AShapeHead,
    BlockSparseHead,
    LayerHeadPatterns,
    TriangleHead,
    VerticalSlashHead,
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
    head_sparse_prefill_triton(*args, out=out)
    expected = head_sparse_prefill_ref(*args).double()
    row_error = (out.double() - expected).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-12)
    assert float(row_error.max()) < 2e-2, f"seed {seed}"
