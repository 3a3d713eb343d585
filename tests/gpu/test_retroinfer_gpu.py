"""RetroInfer on CUDA at real sizes: Triton kernels vs the torch reference (per-row bounds,
bf16 and fp16), full-budget decode vs dense SDPA over a 128K wave index, and the wave buffer
with pinned host memory and side-stream copies.

    python -m pytest -q tests/gpu/test_retroinfer_gpu.py   # on the GPU host: torch + Triton only
"""

from __future__ import annotations

import pytest
import torch

from kv_manager.retroinfer.config import DecodeBudget, WaveIndexConfig
from kv_manager.retroinfer.kernels import decode_ref as ref
from tests.unit.retroinfer_kernel_cases import assert_rows_close, decode_case, step_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SCALE = 128**-0.5
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_reference_at_llama_shape(dtype):
    from kv_manager.retroinfer.kernels import decode_triton as tri

    # 8 sequences x 8 KV heads, 4 query heads each, d=128, 2048 clusters of up to 31 rows.
    case = decode_case(64, 4, 128, 2048, 68, seed=0, device="cuda", dtype=dtype, max_cluster=32)
    tol = TOLERANCE[dtype]
    q, sizes = case["query"], case["sizes"]
    logits = tri.centroid_logits(q, case["centroids"], sizes, SCALE)
    expected_logits = ref.centroid_logits_ref(q, case["centroids"], sizes, SCALE)
    assert_rows_close(logits, expected_logits, rtol=tol, atol=tol)
    rank = tri.cluster_rank(expected_logits)
    assert_rows_close(rank, ref.rank_ref(expected_logits), rtol=1e-4, atol=1e-5)
    retrieval, estimated = 37, 475  # 1.8% and 23.2% of 2048
    r_ids, e_ids = ref.choose_clusters_ref(expected_logits, retrieval, estimated)
    ranges = ref.cluster_ranges(case["offsets"], r_ids, case["steady_ranges"])
    chosen = torch.cat([r_ids, e_ids], dim=1)
    got = tri.merge(
        *tri.ranges_attention(
            q,
            case["keys"],
            case["values"],
            case["steady_ranges"],
            SCALE,
            16,
            cluster_ids=chosen[:, :retrieval],
            offsets=case["offsets"],
        )
    )
    expected = ref.ranges_attention_ref(q, case["keys"], case["values"], ranges, SCALE)
    assert_rows_close(got, expected.out, rtol=tol, atol=tol)
    for splits in (1, 16):
        got = tri.merge(
            *tri.ranges_attention(q, case["keys"], case["values"], ranges, SCALE, splits)
        )
        expected = ref.ranges_attention_ref(q, case["keys"], case["values"], ranges, SCALE)
        assert_rows_close(got, expected.out, rtol=tol, atol=tol)
        got = tri.merge(*tri.estimation(expected_logits, case["value_sums"], sizes, e_ids, splits))
        expected = ref.estimation_ref(expected_logits, case["value_sums"], sizes, e_ids)
        assert_rows_close(got, expected.out, rtol=tol, atol=tol)
    args = step_args(case)
    got = tri.decode_step(*args, retrieval, estimated, SCALE, 16, 8)
    assert_rows_close(
        got, ref.decode_step_ref(*args, retrieval, estimated, SCALE), rtol=tol, atol=tol
    )


def test_full_budget_decode_equals_dense_sdpa_at_128k():
    from kv_manager.retroinfer.kernels import decode_triton as tri
    from kv_manager.retroinfer.wave_index import build_wave_index

    generator = torch.Generator(device="cuda").manual_seed(1)
    tokens, heads, dim = 131072, 8, 128
    keys = (torch.randn(tokens, heads, dim, generator=generator, device="cuda") + 1.5).to(
        torch.bfloat16
    )
    values = torch.randn(tokens, heads, dim, generator=generator, device="cuda").to(torch.bfloat16)
    config = WaveIndexConfig()
    index = build_wave_index(keys, values, config)
    steady = torch.cat([torch.arange(4), torch.arange(tokens - 64, tokens)]).cuda()
    cache_k = torch.cat([index.keys, keys[steady].transpose(0, 1)], dim=1).contiguous()
    cache_v = torch.cat([index.values, values[steady].transpose(0, 1)], dim=1).contiguous()
    steady_ranges = (
        torch.tensor([[index.num_tokens, tokens]], dtype=torch.int32, device="cuda")
        .expand(heads, 1, 2)
        .contiguous()
    )
    query = torch.randn(heads, 4, dim, generator=generator, device="cuda").to(torch.bfloat16)
    budget = DecodeBudget(index.num_clusters, 0)
    got = tri.decode_step(
        query,
        index.centroids.to(torch.bfloat16).contiguous(),
        index.value_sums,
        index.sizes.to(torch.int32),
        index.offsets.to(torch.int32),
        cache_k,
        cache_v,
        steady_ranges,
        budget.retrieval_clusters,
        0,
        SCALE,
    )
    dense = torch.nn.functional.scaled_dot_product_attention(
        query.unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
    )[0]
    assert_rows_close(got, dense, rtol=3e-2, atol=3e-2)


def test_wave_buffer_serves_rows_from_pinned_host_and_cache():
    from kv_manager.retroinfer.wave_buffer import WaveBuffer
    from kv_manager.retroinfer.wave_index import build_wave_index

    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(20000, 8, 128, generator=generator).to(torch.bfloat16)
    values = torch.randn(20000, 8, 128, generator=generator).to(torch.bfloat16)
    index = build_wave_index(keys, values, WaveIndexConfig(segment_tokens=4096))
    buffer = WaveBuffer(index, "cuda", capacity_pages=2000)
    assert buffer.host_keys.is_pinned() and buffer.stream is not None
    ids = torch.stack(
        [torch.randperm(index.num_clusters, generator=generator)[:50] for _ in range(8)]
    )
    for _ in range(2):  # misses, then hits
        batch = buffer.gather(ids)
        batch.wait()
        for head in range(8):
            for slot, cluster in enumerate(ids[head].tolist()):
                start, end = batch.ranges[head, slot].tolist()
                lo, hi = index.offsets[head, cluster], index.offsets[head, cluster + 1]
                assert torch.equal(batch.keys[head, start:end].cpu(), index.keys[head, lo:hi])
                assert torch.equal(batch.values[head, start:end].cpu(), index.values[head, lo:hi])
    assert buffer.stats.cluster_misses == 400 and buffer.stats.cluster_hits == 400


if __name__ == "__main__":  # without pytest: python -m tests.gpu.test_retroinfer_gpu
    for check_dtype in (torch.bfloat16, torch.float16):
        test_kernels_match_reference_at_llama_shape(check_dtype)
        print(f"kernels vs reference, {check_dtype}: ok", flush=True)
    test_full_budget_decode_equals_dense_sdpa_at_128k()
    print("full budget = SDPA at 128K: ok", flush=True)
    test_wave_buffer_serves_rows_from_pinned_host_and_cache()
    print("wave buffer on pinned host memory: ok", flush=True)
