"""Tensor parallelism in tessera's glue (issue 26): each rank's usage snapshot names its rank
and local heads, readers take the maximum over ranks (each sees every row), and a per-head
pattern written for global heads is cut to the rank's contiguous slice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from attention_backends import tensor_parallel
from attention_backends.usage import AttentionUsage, read_usage, total_usage, usage_by_rank
from attention_backends.worker_metrics import render


def _write_rank(stats_dir: Path, pid: int, rank: int, layers: dict) -> None:
    snapshot = {
        "backend": "tessera-cuda",
        "pid": pid,
        "tp_rank": rank,
        "tp_world_size": 2,
        "num_heads": 16,
        "num_kv_heads": 4,
        "steps": 3,
        "layers": layers,
    }
    (stats_dir / f"attention-usage-{pid}.json").write_text(json.dumps(snapshot))


def test_two_ranks_are_read_per_rank_and_not_double_counted(tmp_path: Path):
    rank0 = {"0": {"dense": 100}, "16": {"triangle": 100, "triangle_last_rows": 64}}
    rank1 = {"0": {"dense": 100}, "16": {"triangle": 90, "triangle_last_rows": 64}}
    # Two live processes (the test and its parent) stand for the engine's two ranks.
    _write_rank(tmp_path, os.getpid(), 0, rank0)
    _write_rank(tmp_path, os.getppid(), 1, rank1)
    assert usage_by_rank(tmp_path) == {0: rank0, 1: rank1}
    # rank 1's snapshot was written a step behind: the engine has run rank 0's rows
    assert total_usage(tmp_path) == rank0
    metrics = render(tmp_path)
    assert 'tessera_attention_query_tokens_total{path="triangle"} 100' in metrics
    assert 'tessera_attention_query_tokens_total{path="dense"} 100' in metrics


def test_one_rank_over_two_processes_is_summed(tmp_path: Path):
    """A rank restarted (or the same rank in two runs of a server) adds up, as before."""
    _write_rank(tmp_path, 11, 0, {"0": {"dense": 5}})
    _write_rank(tmp_path, 12, 0, {"0": {"dense": 7}})
    legacy = {"backend": "tessera-cuda", "pid": 13, "steps": 1, "layers": {"0": {"dense": 1}}}
    (tmp_path / "attention-usage-13.json").write_text(json.dumps(legacy))  # no rank: rank 0
    assert total_usage(tmp_path) == {"0": {"dense": 13}}


def test_snapshot_names_rank_world_and_local_heads(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tensor_parallel, "_known_rank", [(1, 2)])
    usage = AttentionUsage(tmp_path, "tessera-cuda")
    usage.set_local_heads(16, 4)
    usage.record(16, "triangle", 8192)
    usage.end_step()
    (snapshot,) = read_usage(tmp_path)
    assert (snapshot["tp_rank"], snapshot["tp_world_size"]) == (1, 2)
    assert (snapshot["num_heads"], snapshot["num_kv_heads"]) == (16, 4)
    assert snapshot["layers"] == {"16": {"triangle": 8192}}


def test_outside_vllms_groups_the_rank_is_zero_of_one(monkeypatch):
    monkeypatch.setattr(tensor_parallel, "_known_rank", [])
    assert tensor_parallel.tensor_parallel_rank() == (0, 1)


def test_per_head_patterns_are_cut_to_the_ranks_heads():
    heads_mod = pytest.importorskip("attention_backends.patterns.minference.heads")
    # distinct per head, so a wrong slice shows
    patterns = [
        heads_mod.make_head_pattern("vertical_slash", vertical_size=1000 + i) for i in range(8)
    ]
    layer = heads_mod.LayerHeadPatterns(tuple(patterns))
    cut = tensor_parallel.local_heads_pattern(layer, 4, rank=1, world_size=2)
    assert cut.heads == tuple(patterns[4:8]) and cut.block_size == layer.block_size
    assert tensor_parallel.local_heads_pattern(layer, 8, rank=0, world_size=1) is layer
    with pytest.raises(ValueError, match="8 heads cannot be cut into 3 ranks of 4"):
        tensor_parallel.local_heads_pattern(layer, 4, rank=0, world_size=3)
    triangle = object()  # a pattern without heads is the same on every rank
    assert tensor_parallel.local_heads_pattern(triangle, 4, rank=1, world_size=2) is triangle
