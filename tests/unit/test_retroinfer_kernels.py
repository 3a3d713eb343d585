"""RetroInfer GPU decode: the GPU-layout torch reference vs the tripartite definition, and
each Triton kernel vs its reference under TRITON_INTERPRET=1 (fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kv_manager.retroinfer.attention import dense_partial
from kv_manager.retroinfer.kernels import decode_ref as ref
from tests.unit.retroinfer_kernel_cases import assert_rows_close, decode_case, step_args

SCALE = 0.125
# (rows, groups, dim, clusters, steady rows)
CASES = [(3, 4, 32, 20, 10), (2, 1, 64, 33, 0), (4, 3, 32, 9, 70)]


def test_reference_with_every_cluster_retrieved_equals_dense():
    case = decode_case(3, 4, 32, 20, 10, seed=0)
    clusters = case["sizes"].shape[1]
    got = ref.decode_step_ref(
        case["query"],
        case["centroids"],
        case["value_sums"],
        case["sizes"],
        case["offsets"],
        case["keys"],
        case["values"],
        case["steady_ranges"],
        clusters,
        0,
        SCALE,
    )
    for row in range(3):
        used = int(case["steady_ranges"][row, 0, 1])
        dense = dense_partial(
            case["query"][row][None, None],
            case["keys"][row, :used][None],
            case["values"][row, :used][None],
            SCALE,
        )
        assert_rows_close(got[row], dense.out[0, 0], rtol=1e-5, atol=1e-6)


def test_reference_estimation_of_single_row_clusters_is_exact():
    # A one-row cluster's centroid is its key: estimating it is exact attention.
    case = decode_case(2, 2, 32, 30, 5, seed=1, max_cluster=2)
    sizes = case["sizes"]
    logits = ref.centroid_logits_ref(case["query"], case["centroids"], sizes, SCALE)
    ids = torch.arange(sizes.shape[1]).expand(2, -1)
    est = ref.estimation_ref(logits, case["value_sums"], sizes, ids)
    ranges = ref.cluster_ranges(case["offsets"].long(), ids)
    exact = ref.ranges_attention_ref(case["query"], case["keys"], case["values"], ranges, SCALE)
    assert_rows_close(est.out, exact.out, rtol=1e-5, atol=1e-6)
    assert_rows_close(est.lse, exact.lse, rtol=1e-5, atol=1e-5)


def check_interpreted_kernels() -> None:
    """Every kernel and the whole step vs the reference; run with TRITON_INTERPRET=1."""
    from kv_manager.retroinfer.kernels import decode_triton as tri

    for seed, (rows, groups, dim, clusters, steady) in enumerate(CASES):
        check_case(
            tri, decode_case(rows, groups, dim, clusters, steady, seed=seed + 10), tolerance=1e-5
        )
    # fp16 storage (bf16 cannot be checked here: the interpreter's bf16 tl.dot is wrong;
    # tests/gpu/test_retroinfer_gpu.py checks bf16 natively).
    check_case(tri, decode_case(3, 4, 32, 20, 10, seed=20, dtype=torch.float16), tolerance=1e-2)


def check_case(tri, case: dict, tolerance: float) -> None:
    """Each kernel and the whole step vs the reference on one case."""
    clusters = case["sizes"].shape[1]
    q, sizes, offsets = case["query"], case["sizes"], case["offsets"]
    logits = tri.centroid_logits(q, case["centroids"], sizes, SCALE, block_c=16)
    expected_logits = ref.centroid_logits_ref(q, case["centroids"], sizes, SCALE)
    assert_rows_close(logits, expected_logits, rtol=tolerance, atol=tolerance)
    rank = tri.cluster_rank(logits, block_c=8)
    assert_rows_close(rank, ref.rank_ref(expected_logits), rtol=tolerance, atol=tolerance)
    retrieval, estimated = min(4, clusters // 2), clusters // 3
    r_ids, e_ids = ref.choose_clusters_ref(expected_logits, retrieval, estimated)
    ranges = ref.cluster_ranges(offsets.long(), r_ids, case["steady_ranges"])
    # Cluster mode: ids as a strided view (as decode_step passes them), ranges from offsets.
    chosen = torch.cat([r_ids, e_ids], dim=1)
    for splits in (1, 3):
        got = tri.merge(
            *tri.ranges_attention(
                q,
                case["keys"],
                case["values"],
                case["steady_ranges"],
                SCALE,
                splits,
                cluster_ids=chosen[:, :retrieval],
                offsets=offsets,
            )
        )
        expected = ref.ranges_attention_ref(q, case["keys"], case["values"], ranges, SCALE)
        assert_rows_close(got, expected.out, rtol=tolerance, atol=tolerance)
        e_out, e_lse = tri.estimation(
            expected_logits, case["value_sums"], sizes, chosen[:, retrieval:], splits, block_e=4
        )
        expected_est = ref.estimation_ref(expected_logits, case["value_sums"], sizes, e_ids)
        assert_rows_close(tri.merge(e_out, e_lse), expected_est.out, rtol=tolerance, atol=tolerance)
    for splits in (1, 3):
        out, lse = tri.ranges_attention(q, case["keys"], case["values"], ranges, SCALE, splits)
        got = tri.merge(out, lse)
        expected = ref.ranges_attention_ref(q, case["keys"], case["values"], ranges, SCALE)
        assert_rows_close(got, expected.out, rtol=tolerance, atol=tolerance)
        e_out, e_lse = tri.estimation(
            expected_logits, case["value_sums"], sizes, e_ids, splits, block_e=4
        )
        expected_est = ref.estimation_ref(expected_logits, case["value_sums"], sizes, e_ids)
        assert_rows_close(tri.merge(e_out, e_lse), expected_est.out, rtol=tolerance, atol=tolerance)
        merged_lse = torch.logsumexp(e_lse, dim=1)
        assert_rows_close(merged_lse, expected_est.lse, rtol=tolerance, atol=tolerance)
    args = step_args(case)
    got = tri.decode_step(
        *args, retrieval, estimated, SCALE, retrieval_splits=2, estimation_splits=2
    )
    expected = ref.decode_step_ref(*args, retrieval, estimated, SCALE)
    assert_rows_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="covered natively by tests/gpu/test_retroinfer_gpu.py")
def test_triton_kernels_match_reference_interpreted():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.unit.test_retroinfer_kernels import "
            "check_interpreted_kernels as check; check()",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
