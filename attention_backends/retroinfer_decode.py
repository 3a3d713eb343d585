"""RetroInfer decode for long sequences on vLLM's CPU worker (thin glue).

On with ``attention.retroinfer_min_tokens`` > 0 (env ``TESSERA_ATTENTION_RETROINFER_MIN_TOKENS``):
in a decode-only step, every sequence whose context before the new token has at least that
many tokens (and enough for the index) is answered by ``kv_manager.retroinfer``: at its first
such step the layer's tokens so far are read from vLLM's paged cache and indexed
(``LayerSequenceState``); later steps append the new token (already written to the cache by
vLLM's ``do_kv_cache_update``) and decode from the index. States are kept per (request id,
layer) and dropped when their request leaves the batch; a length that does not follow on
(preemption, recompute) rebuilds the state.

Request ids: vLLM's attention metadata carries none, so, like ``prompt_lengths``, the model
runner's step preparation is wrapped to publish ``(query_start_loc, req_ids)``; a builder's
batch that does not match the published step (profile/warm-up runs) stays dense.

This CPU path exists for fidelity (the served model answering through RetroInfer decode),
not speed: it keeps its own cluster-sorted copy of the K/V (the paged cache is not re-laid
out), and a decode step mixing short and long sequences runs vLLM's dense kernel for all of
them before overwriting the long ones.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kv_manager.retroinfer.config import WaveIndexConfig
from kv_manager.retroinfer.sequence import LayerSequenceState


@dataclass(frozen=True)
class StepRequests:
    query_start_loc: np.ndarray
    req_ids: tuple[str, ...]


_published: StepRequests | None = None


def publish(query_start_loc: np.ndarray, req_ids: list[str]) -> None:
    global _published
    _published = StepRequests(np.asarray(query_start_loc, dtype=np.int64).copy(), tuple(req_ids))


def request_ids_for_batch(query_start_loc: np.ndarray) -> tuple[str, ...] | None:
    """The published step's request ids if this batch is that step, else None."""
    step = _published
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    if step is None:
        return None
    count = len(step.req_ids)
    if query_start_loc.shape[0] < count + 1 or not np.array_equal(
        query_start_loc[: count + 1], step.query_start_loc[: count + 1]
    ):
        return None
    return step.req_ids


def _publish_from(read: Callable, *args) -> None:
    global _published
    try:
        publish(*read(*args))
    except (AttributeError, IndexError, TypeError):
        _published = None  # another vLLM layout: stay dense rather than guess


def _wrap_v1(runner_class: type, method: str) -> None:
    original = getattr(runner_class, method)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        _publish_from(_read_v1, self)
        return original(self, *args, **kwargs)

    wrapper.__tessera_retroinfer__ = True  # type: ignore[attr-defined]
    setattr(runner_class, method, wrapper)


def _wrap_v2(runner_class: type, method: str) -> None:
    original = getattr(runner_class, method)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        input_batch = original(self, *args, **kwargs)
        _publish_from(_read_v2, input_batch)
        return input_batch

    wrapper.__tessera_retroinfer__ = True  # type: ignore[attr-defined]
    setattr(runner_class, method, wrapper)


def _read_v1(runner) -> tuple[np.ndarray, list[str]]:
    count = runner.input_batch.num_reqs
    return runner.query_start_loc.np[: count + 1], list(runner.input_batch.req_ids[:count])


def _read_v2(input_batch) -> tuple[np.ndarray, list[str]]:
    count = input_batch.num_reqs
    return input_batch.query_start_loc_np[: count + 1], list(input_batch.req_ids[:count])


_RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_build_attention_metadata", _wrap_v1),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_inputs", _wrap_v2),
)


def install_runner_hooks() -> None:
    """Wrap the loaded model runners (idempotent; chains with prompt_lengths' wrappers)."""
    for module_name, class_name, method, wrap in _RUNNERS:
        module = sys.modules.get(module_name)
        runner_class = getattr(module, class_name, None) if module else None
        if runner_class is None or not hasattr(runner_class, method):
            continue
        if not getattr(getattr(runner_class, method), "__tessera_retroinfer__", False):
            wrap(runner_class, method)


def read_tokens(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_row: torch.Tensor,
    start: int,
    stop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [start, stop) of one sequence from logical paged caches
    [num_blocks, H, block_size, d]: keys, values [stop - start, H, d]."""
    block_size = key_cache.shape[2]
    positions = torch.arange(start, stop)
    blocks = block_row[positions // block_size].long()
    offsets = positions % block_size
    return key_cache[blocks, :, offsets], value_cache[blocks, :, offsets]


class RetroInferDecoder:
    """Per-(request, layer) RetroInfer states of one worker process."""

    def __init__(self, min_tokens: int, config: WaveIndexConfig | None = None) -> None:
        self.min_tokens = min_tokens
        self.config = config or WaveIndexConfig()
        self.states: dict[tuple[str, int], LayerSequenceState] = {}
        self.rebuilds = 0

    def handles(self, context_tokens: int) -> bool:
        return context_tokens >= self.min_tokens and self.config.uses_index(context_tokens)

    def keep_only(self, live: set[str]) -> None:
        """Drop the states of requests no longer in the batch."""
        for key in [key for key in self.states if key[0] not in live]:
            del self.states[key]

    def decode_sequence(
        self,
        request_id: str,
        layer: int,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_row: torch.Tensor,
        seq_len: int,
        scale: float,
    ) -> torch.Tensor:
        """Attention of one decode query [Hq, d] (the token at position seq_len - 1, already
        in the cache) over the sequence, by RetroInfer. Returns [Hq, d] float32."""
        context = seq_len - 1
        state = self.states.get((request_id, layer))
        if state is None or state.length != context:
            keys, values = read_tokens(key_cache, value_cache, block_row, 0, context)
            state = LayerSequenceState(keys.float(), values.float(), self.config)
            self.states[(request_id, layer)] = state
            self.rebuilds += 1
        key, value = read_tokens(key_cache, value_cache, block_row, context, seq_len)
        state.append(key[0].float(), value[0].float())
        kv_heads = key.shape[1]
        q = query.float().view(kv_heads, -1, query.shape[-1])
        return state.decode(q, scale=scale).out[0].reshape(query.shape)


_decoder: RetroInferDecoder | None = None


def decoder(min_tokens: int, config: WaveIndexConfig | None = None) -> RetroInferDecoder:
    """The process's decoder (one per worker; rebuilt if the settings change)."""
    global _decoder
    config = config or WaveIndexConfig()
    if _decoder is None or (_decoder.min_tokens, _decoder.config) != (min_tokens, config):
        _decoder = RetroInferDecoder(min_tokens, config)
    return _decoder


def forward_decode_step(
    layer_index: int,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn_metadata,
    output: torch.Tensor,
    scale: float,
    min_tokens: int,
    dense: Callable[[], None],
    config: WaveIndexConfig | None = None,
) -> int:
    """Answer a decode-only step (query/output [tokens, Hq, d] or output [tokens, Hq * d]);
    returns how many sequences RetroInfer answered (the rest, if any, came from ``dense``).
    key_cache/value_cache: logical [blocks, H, block_size, d]."""
    query_start_loc = attn_metadata.query_start_loc.numpy()
    seq_lens = attn_metadata.seq_lens.numpy()
    req_ids = request_ids_for_batch(query_start_loc)
    state = decoder(min_tokens, config)
    if req_ids is None:
        dense()
        return 0
    if layer_index == 0:
        state.keep_only(set(req_ids))
    long = [seq for seq in range(len(req_ids)) if state.handles(int(seq_lens[seq]) - 1)]
    if len(long) < len(req_ids):
        dense()  # short sequences need vLLM's kernel; the long rows are overwritten below
    heads_view = output.view(query.shape)
    for seq in long:
        row = int(query_start_loc[seq])
        heads_view[row] = state.decode_sequence(
            req_ids[seq],
            layer_index,
            query[row],
            key_cache,
            value_cache,
            attn_metadata.block_table[seq],
            int(seq_lens[seq]),
            scale,
        ).to(output.dtype)
    return len(long)
