"""GPU placement of locally launched workers (issue 26: data parallel behind the gateway).

Pure planning and the exact command line / environment a worker is started with; the
multi-GPU runs themselves need a multi-GPU host (scripts/gpu/README.md)."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import ServerSettings
from server.gpu_placement import NVLINK_MULTICAST_OFF, GpuSlot, plan_workers, visible_gpus
from server.launcher import place_workers, start_waves, worker_launch


def test_visible_gpus_follow_the_launchers_own_restriction():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}, lambda: 8) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, lambda: 8) == []
    assert visible_gpus({}, lambda: 3) == ["0", "1", "2"]


def test_auto_is_one_worker_per_group_and_leftovers_stay_unused():
    assert plan_workers(["0", "1", "2", "3"], None, 1) == [
        GpuSlot(("0",)), GpuSlot(("1",)), GpuSlot(("2",)), GpuSlot(("3",))]
    assert plan_workers(["0", "1", "2"], None, 2) == [GpuSlot(("0", "1"))]


def test_more_workers_than_groups_share_them_evenly():
    slots = plan_workers(["0", "1"], 3, 1)
    assert [slot.devices for slot in slots] == [("0",), ("1",), ("0",)]
    assert [slot.sharing for slot in slots] == [2, 1, 2]


def test_too_few_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 2 GPU.*1 are visible"):
        plan_workers(["0"], None, 2)
    with pytest.raises(ValueError, match="none"):
        plan_workers([], 1, 1)


def test_slot_flags_tensor_parallel_and_memory_share_unless_the_user_set_them():
    pair = GpuSlot(("0", "1"))
    assert pair.args(0.9, []) == ["--tensor-parallel-size", "2"]
    assert pair.args(0.9, ["--tensor-parallel-size=2"]) == []
    shared = GpuSlot(("0",), sharing=2)
    assert shared.args(0.9, []) == ["--gpu-memory-utilization", "0.450"]
    assert GpuSlot(("0",), sharing=3).args(0.9, []) == ["--gpu-memory-utilization", "0.300"]
    assert shared.args(0.9, ["--gpu-memory-utilization", "0.2"]) == []
    assert GpuSlot(("0",)).args(0.9, []) == []


def test_slot_env_pins_devices_and_turns_nvlink_multicast_off():
    env = GpuSlot(("3", "4")).env()
    assert env["CUDA_VISIBLE_DEVICES"] == "3,4"
    assert {k: env[k] for k in NVLINK_MULTICAST_OFF} == {
        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1"}


def test_place_workers_resolves_auto_and_honours_a_tensor_parallel_extra_arg():
    settings, slots = place_workers(ServerSettings(workers="auto"), gpus=["0", "1", "2", "3"])
    assert settings.workers == 4 and len(slots) == 4
    tp = ServerSettings(workers="auto", worker_extra_args=["--tensor-parallel-size", "2"])
    settings, slots = place_workers(tp, gpus=["0", "1", "2", "3"])
    assert settings.workers == 2 and [s.devices for s in slots] == [("0", "1"), ("2", "3")]
    assert place_workers(ServerSettings(workers="auto"), gpus=[]) [0].workers == 1
    assert place_workers(ServerSettings(workers=0), gpus=["0"]) == (ServerSettings(workers=0),
                                                                     None)


def test_the_worker_is_started_on_its_gpus(tmp_path: Path):
    settings, slots = place_workers(ServerSettings(workers=2, data_dir=tmp_path), gpus=["7"])
    command, env = worker_launch(settings, tmp_path, 1, 9001, slots[1])
    assert env["CUDA_VISIBLE_DEVICES"] == "7" and env["NCCL_NVLS_ENABLE"] == "0"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.450"
    assert command[command.index("--port") + 1] == "9001"
    command, env = worker_launch(settings, tmp_path, 0, 9000, None)
    assert "--gpu-memory-utilization" not in command


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("3", 3), (2, 2)])
def test_workers_setting_takes_a_count_or_auto(value, expected, monkeypatch):
    assert ServerSettings(workers=value).workers == expected
    monkeypatch.setenv("TESSERA_WORKERS", str(value))
    assert ServerSettings().workers == expected


@pytest.mark.parametrize("value", [-1, "many"])
def test_workers_setting_refuses_nonsense(value):
    with pytest.raises(ValidationError):
        ServerSettings(workers=value)


def test_flag_value_reads_both_spellings():
    from server.gpu_placement import flag_value

    assert flag_value(["--tensor-parallel-size", "4"], "--tensor-parallel-size") == "4"
    assert flag_value(["--x", "--tensor-parallel-size=2"], "--tensor-parallel-size") == "2"
    assert flag_value(["--tensor-parallel-size"], "--tensor-parallel-size") is None
    assert flag_value([], "--tensor-parallel-size") is None


def test_workers_sharing_a_gpu_start_one_after_another():
    # Two workers on GPU 0 and two on GPU 1: one of each per wave (vLLM's memory profile
    # counts a neighbour's allocations as its own), GPUs in parallel, CPU workers together.
    shared = plan_workers(["0", "1"], 4, 1)
    assert start_waves(shared) == [[0, 1], [2, 3]]
    assert start_waves(plan_workers(["0", "1"], 2, 1)) == [[0, 1]]
    assert start_waves(plan_workers(["0"], 3, 1)) == [[0], [1], [2]]
    assert start_waves([None, None, None]) == [[0, 1, 2]]
