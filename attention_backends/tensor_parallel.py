"""What a tensor-parallel rank of vLLM sees of the attention heads (issue 26).

Under ``--tensor-parallel-size T`` vLLM's QKV projection gives rank r the contiguous query
heads [r*H/T, (r+1)*H/T) and KV heads [r*K/T, (r+1)*K/T) (one replicated KV head per rank
when T > K), and the attention impl is built with those local counts (``num_heads``,
``num_kv_heads``). TriangleMix's pattern is the same for every head, so it needs nothing per
rank; a per-head pattern (MInference's configs hold global head ids) is cut to the rank's
slice here. vLLM is imported only when a rank is asked for, so readers stay light.
"""

from __future__ import annotations

import dataclasses

_known_rank: list[tuple[int, int]] = []


def tensor_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of this process in vLLM's tensor-parallel group; (0, 1) outside
    vLLM or before its groups exist. Once the groups exist they are fixed for the process's
    life, so that answer is kept (the usage snapshot asks at every step)."""
    if _known_rank:
        return _known_rank[0]
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        return 0, 1
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    _known_rank.append(
        (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
    )
    return _known_rank[0]


def local_heads_pattern(
    pattern, local_heads: int, rank: int | None = None, world_size: int | None = None
):
    """``pattern`` as this rank runs it: per-head patterns (objects with a ``heads`` tuple,
    one entry per global query head) are cut to the rank's contiguous slice; any other
    pattern is returned as is."""
    heads = getattr(pattern, "heads", None)
    if heads is None or len(heads) == local_heads:
        return pattern
    if rank is None or world_size is None:
        rank, world_size = tensor_parallel_rank()
    if len(heads) != local_heads * world_size:
        raise ValueError(
            f"a per-head pattern for {len(heads)} heads cannot be cut into "
            f"{world_size} ranks of {local_heads} heads"
        )
    return dataclasses.replace(
        pattern, heads=tuple(heads[rank * local_heads : (rank + 1) * local_heads])
    )
