"""benchmarks/gpu_tensor_parallel.py's harness on the CPU (issue 26): the servers it would
start (GPUs, TP size, multicast off, equal KV capacity), the summary, merge and plots of a
result built here from synthetic runs (no stored result: the numbers mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

tp = pytest.importorskip("gpu_tensor_parallel")


def test_ttft_servers_are_placed_and_sized_alike():
    servers = {s.name: s for s in tp.ttft_servers(Path("/tmp/unused"))}
    assert list(servers) == list(tp.TTFT_NAMES)
    for name, server in servers.items():
        two = name.startswith("tp2")
        assert server.env["CUDA_VISIBLE_DEVICES"] == ("0,1" if two else "0")
        assert server.env["NCCL_NVLS_ENABLE"] == "0" and server.env["NVSHMEM_DISABLE_NVLS"] == "1"
        assert ("--tensor-parallel-size" in server.args) == two
        kv = int(server.args[server.args.index("--kv-cache-memory-bytes") + 1])
        # same token capacity: 8B shape, 128 KiB a token at TP=1, half of it per rank at TP=2
        assert kv // ((128 << 10) // (2 if two else 1)) == 135168
        assert ("CUSTOM" in server.args) == name.endswith("trianglemix")
    assert servers["tp2_trianglemix"].env["TESSERA_ATTENTION_DENSE_FIRST_LAYERS"] == "16"


def test_equality_servers_cover_each_backend_at_both_sizes():
    servers = tp.equality_servers(Path("/tmp/unused"))
    names = [s.name for s, _ in servers]
    assert names == [
        "tp1_fa3",
        "tp2_fa3",
        "tp1_dense",
        "tp2_dense",
        "tp1_trianglemix",
        "tp2_trianglemix",
        "orig_tp1_fa3",
    ]
    assert len({s.port for s, _ in servers}) == len(servers)
    tri = dict((s.name, s) for s, _ in servers)["tp2_trianglemix"]
    assert tri.env["TESSERA_ATTENTION_DENSE_FIRST_LAYERS"] == str(tp.SMOLLM2_SPLIT)


def _runs(scale: dict[str, float], sizes: list[int], repeats: int = 5) -> list[dict]:
    return [
        {
            "server": name,
            "tokens": size,
            "repeat": r,
            "ttft_s": scale[name] * size / 32768 * (1 + 0.01 * r),
        }
        for size in sizes
        for r in range(repeats)
        for name in tp.TTFT_NAMES
    ]


def test_summary_merge_and_plots(tmp_path: Path):
    scale = {"tp1_fa3": 1.2, "tp1_trianglemix": 1.0, "tp2_fa3": 0.7, "tp2_trianglemix": 0.6}
    first = {"phase": "ttft", "sizes": [32768], "runs": _runs(scale, [32768]), "usage": {}}
    second = {
        "phase": "ttft",
        "sizes": [65536],
        "runs": _runs(scale, [65536]),
        "usage": {"tp2_trianglemix": {"total": {}}},
    }
    merged = tp.merge([first, second])
    assert merged["sizes"] == [32768, 65536] and merged["calls"] == 2
    assert merged["ttft_median_s"]["tp1_fa3@32768"] == pytest.approx(1.2 * 1.02)
    assert merged["tp2_vs_tp1_pct"]["fa3@65536"] == pytest.approx(100 * (0.7 / 1.2 - 1))
    assert merged["trianglemix_vs_fa3_pct"]["tp2@32768"] == pytest.approx(100 * (0.6 / 0.7 - 1))
    assert merged["usage"] == second["usage"]  # cumulative counters: the last call's
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    for part, value in zip(parts, (first, second), strict=True):
        part.write_text(json.dumps(value))
    script = str(ROOT / "benchmarks" / "gpu_tensor_parallel.py")
    subprocess.run(
        [sys.executable, script, "--merge", *map(str, parts), "--out", str(tmp_path)],
        check=True,
        timeout=120,
    )
    assert (tmp_path / "gpu_tensor_parallel_ttft.png").stat().st_size > 10_000
    equality = {
        "phase": "equality",
        "tp2_vs_tp1": {b: {"identical": 20, "prompts": 22} for b in tp.EQUALITY_BACKENDS},
        "controls": {"padded_vs_original_tp1_fa3": {"identical": 22, "prompts": 22}},
    }
    path = tmp_path / "equality.json"
    path.write_text(json.dumps(equality))
    subprocess.run([sys.executable, script, "--plot-only", str(path)], check=True, timeout=120)
    assert path.with_suffix(".png").stat().st_size > 5_000


def test_first_difference_and_compare():
    assert tp.first_difference("abc", "abc") is None
    assert tp.first_difference("abcd", "abxd") == 2
    assert tp.first_difference("ab", "abc") == 2
    result = tp.compare({"x": ["a", "b"], "y": ["a", "c"]}, "x", "y")
    assert result == {"identical": 1, "prompts": 2, "first_difference_char": [None, 0]}


def test_refuses_a_host_without_two_gpus():
    script = str(ROOT / "benchmarks" / "gpu_tensor_parallel.py")
    done = subprocess.run(
        [sys.executable, script, "ttft", "--out", "/tmp/never"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if tp.gpu_count() >= 2:
        pytest.skip("this host has 2 GPUs")
    assert done.returncode != 0 and "needs a host with 2 GPUs" in done.stderr
