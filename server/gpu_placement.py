"""Which GPUs each locally launched vLLM worker gets (data parallel behind the gateway).

`tessera serve` on a CUDA host places its workers on the visible GPUs: worker i gets the
i-th group of `gpus_per_worker` devices through CUDA_VISIBLE_DEVICES, and a group larger
than one GPU is served with vLLM's own tensor parallelism (`--tensor-parallel-size`). With
`workers: auto` there is one worker per group. When more workers are asked for than there
are groups, workers share a group, and each takes an equal share of its memory
(`--gpu-memory-utilization`), which is how two workers run on one GPU for testing the router.

Every GPU worker also gets NVLink multicast turned off (NCCL NVLS, torch symmetric memory,
NVSHMEM): the lent multi-GPU hosts require it, in every process vLLM starts, and the
variables are inherited by vLLM's own worker processes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from server.tp_padding import splits

NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# vLLM flags this module sets; a user's own value in worker_extra_args wins.
TENSOR_PARALLEL_FLAG = "--tensor-parallel-size"
MEMORY_FLAG = "--gpu-memory-utilization"


class PlacementError(ValueError):
    """The workers cannot be placed as asked; the message says why and what to change."""


@dataclass(frozen=True)
class GpuSlot:
    """The devices of one worker, as the launching process names them, and how many
    workers (this one included) were placed on the same devices."""

    devices: tuple[str, ...]
    sharing: int = 1

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices), **NVLINK_MULTICAST_OFF}

    def args(self, memory_utilization: float, extra_args: list[str]) -> list[str]:
        """vLLM flags for this slot, leaving out any the user already passes."""
        given = {arg.split("=", 1)[0] for arg in extra_args}
        args: list[str] = []
        if len(self.devices) > 1 and TENSOR_PARALLEL_FLAG not in given:
            args += [TENSOR_PARALLEL_FLAG, str(len(self.devices))]
        if self.sharing > 1 and MEMORY_FLAG not in given:
            # Floor to 3 decimals so the shares never add up to more than asked for.
            share = math.floor(memory_utilization / self.sharing * 1000) / 1000
            args += [MEMORY_FLAG, f"{share:.3f}"]
        return args


def flag_value(args: list[str], flag: str) -> str | None:
    """The value given for ``flag`` in a vLLM argument list (``--f V`` or ``--f=V``)."""
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
    return None


def visible_gpus(environ: Mapping[str, str] | None = None,
                 device_count: Callable[[], int] | None = None) -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES's entries when it is set
    (so a launcher confined to some GPUs confines its workers too), else 0..count-1."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item.strip() for item in listed.split(",") if item.strip()]
    if device_count is None:
        device_count = _torch_device_count
    return [str(index) for index in range(device_count())]


def _torch_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_workers(gpus: list[str], workers: int | None, gpus_per_worker: int) -> list[GpuSlot]:
    """One slot per worker. ``workers=None`` means one worker per group of
    ``gpus_per_worker`` GPUs; leftover GPUs (fewer than a group) stay unused."""
    if gpus_per_worker < 1:
        raise ValueError(f"gpus_per_worker must be >= 1, got {gpus_per_worker}")
    groups = [tuple(gpus[start:start + gpus_per_worker])
              for start in range(0, len(gpus) - gpus_per_worker + 1, gpus_per_worker)]
    if not groups:
        raise PlacementError(
            f"each worker needs {gpus_per_worker} GPU(s) but {len(gpus)} are visible "
            f"({', '.join(gpus) or 'none'}); lower gpus_per_worker or set CUDA_VISIBLE_DEVICES")
    count = len(groups) if workers is None else workers
    placed = [groups[index % len(groups)] for index in range(count)]
    return [GpuSlot(devices, sharing=placed.count(devices)) for devices in placed]


def tensor_parallel_size(slot: GpuSlot | None, extra_args: list[str]) -> int:
    """The --tensor-parallel-size a worker runs with: the user's own flag, else its GPUs."""
    given = flag_value(extra_args, TENSOR_PARALLEL_FLAG)
    if given is not None:
        return int(given)
    return len(slot.devices) if slot is not None else 1


def check_heads_split(model_path: Path, tensor_parallel: int) -> None:
    """Refuse, before any worker starts, a model whose attention heads vLLM cannot shard
    ``tensor_parallel`` ways (vLLM's rule: ``tp_padding.splits``). vLLM itself checks
    only the query heads at config time (a pydantic error on the worker's log); the KV heads
    fail later, as a bare AssertionError in every rank while the model loads."""
    config_file = Path(model_path) / "config.json"
    if tensor_parallel <= 1 or not config_file.is_file():
        return  # a hub name or a GGUF file: vLLM's own check is all there is
    config = json.loads(config_file.read_text())
    config = config.get("text_config") or config  # multimodal configs nest the LM's
    heads = config.get("num_attention_heads")
    if heads is None:
        return
    kv_heads = int(config.get("num_key_value_heads") or heads)
    heads = int(heads)
    if splits(heads, kv_heads, tensor_parallel):
        return
    raise PlacementError(
        f"{model_path} has {heads} query and {kv_heads} KV attention heads, which do not "
        f"split over {tensor_parallel} GPUs (tensor parallelism needs the query heads to be "
        f"a multiple of {tensor_parallel}, and the KV heads a multiple or a divisor of it). "
        f"Use gpus_per_worker 1 (one worker per GPU), a tensor-parallel size that divides "
        f"both, or a padded copy with the same outputs: "
        f"python3 -m server.tp_padding --src {model_path} --dst DIR "
        f"--tensor-parallel-size {tensor_parallel}")
