"""Each step's prompt lengths, carried from vLLM's model runner to tessera's metadata builders.

TriangleMix's last-q rows are the last ``last_q_tokens`` tokens of the *prompt*. Under chunked
prefill a step holds one chunk of it, and vLLM's attention metadata
(``CommonAttentionMetadata``: query_start_loc, seq_lens, block table, ...) says where the
chunk ends, not where the prompt ends. The model runner knows: the V1 runner keeps
``input_batch.num_prompt_tokens``, the V2 runner puts ``prefill_len_np`` (the prompt, plus
any output being re-prefilled after a preemption) in each step's ``InputBatch``.

So the backend wraps the runner method that prepares a step (done once, from the first
metadata builder built in the worker process) to publish ``(query_start_loc, prompt_lens)``
of that step. A builder takes them only when its batch's ``query_start_loc`` matches the
published one; batches the runner makes up itself (profile and warm-up runs, CUDA-graph
capture) do not match, and their chunk end stands in for the prompt end, which runs more rows
dense, never fewer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("tessera.prompt_lengths")


@dataclass(frozen=True)
class StepPromptLengths:
    query_start_loc: np.ndarray  # int [num_reqs + 1], the step's packed query offsets
    prompt_lens: np.ndarray  # int [num_reqs], same request order


_published: StepPromptLengths | None = None


def publish(query_start_loc: np.ndarray, prompt_lens: np.ndarray) -> None:
    """Record the step the runner is about to run (copies: the runner reuses its buffers)."""
    global _published
    _published = StepPromptLengths(
        np.asarray(query_start_loc, dtype=np.int64).copy(),
        np.asarray(prompt_lens, dtype=np.int64).copy(),
    )


def clear() -> None:
    global _published
    _published = None


def prompt_lens_for_batch(query_start_loc: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    """Int64 ``[num_seqs]`` prompt lengths for a builder's batch.

    query_start_loc ``[num_seqs + 1]`` and seq_lens ``[num_seqs]`` (cached + new tokens) are
    the builder's CPU copies; the batch may be padded past the runner's requests (empty
    queries). Where the published step matches, each request gets its prompt length; where
    it does not, or for padding, the sequence's own length (the chunk end). Never below the
    sequence length: the rows of a chunk cannot lie past the prompt being prefilled.
    """
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    result = seq_lens.copy()
    step = _published
    if step is None:
        return result
    num_reqs = step.prompt_lens.shape[0]
    if (
        num_reqs <= seq_lens.shape[0]
        and query_start_loc.shape[0] >= num_reqs + 1
        and np.array_equal(query_start_loc[: num_reqs + 1], step.query_start_loc[: num_reqs + 1])
    ):
        result[:num_reqs] = np.maximum(step.prompt_lens, seq_lens[:num_reqs])
    return result


@contextlib.contextmanager
def _never_fatal():
    """A runner whose fields moved (another vLLM version) must still serve: nothing is
    published then, and builders fall back to each chunk's end (logged once)."""
    try:
        yield
    except (AttributeError, IndexError, TypeError) as error:
        clear()
        if not _warned:
            _warned.append(True)
            logger.warning("tessera: cannot read prompt lengths from vLLM's runner (%s); each "
                           "chunk's end stands in for the prompt's end", error)


_warned: list[bool] = []


def _wrap_v1_runner(runner_class: type) -> None:
    original = runner_class._build_attention_metadata

    @functools.wraps(original)
    def build_attention_metadata(self, *args, **kwargs):
        with _never_fatal():
            batch = self.input_batch
            num_reqs = batch.num_reqs
            publish(self.query_start_loc.np[: num_reqs + 1], batch.num_prompt_tokens[:num_reqs])
        return original(self, *args, **kwargs)

    build_attention_metadata.__tessera_hook__ = True  # type: ignore[attr-defined]
    runner_class._build_attention_metadata = build_attention_metadata


def _wrap_v2_runner(runner_class: type) -> None:
    original = runner_class.prepare_inputs

    @functools.wraps(original)
    def prepare_inputs(self, *args, **kwargs):
        input_batch = original(self, *args, **kwargs)
        with _never_fatal():
            num_reqs = input_batch.num_reqs
            publish(input_batch.query_start_loc_np[: num_reqs + 1],
                    input_batch.prefill_len_np[:num_reqs])
        return input_batch

    prepare_inputs.__tessera_hook__ = True  # type: ignore[attr-defined]
    runner_class.prepare_inputs = prepare_inputs


# (module, class, method, wrapper): the V1 and V2 GPU model runners; the CPU runners
# subclass them without overriding these methods.
_RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_build_attention_metadata",
     _wrap_v1_runner),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_inputs", _wrap_v2_runner),
)


def install_runner_hooks() -> list[str]:
    """Wrap every model-runner class this process has loaded (idempotent). Returns the
    ``module.Class`` names hooked now or before. Called from a builder's ``__init__``: by
    then the worker has imported its runner, and nothing is imported here."""
    hooked = []
    for module_name, class_name, method, wrap in _RUNNERS:
        module = sys.modules.get(module_name)
        runner_class = getattr(module, class_name, None) if module else None
        if runner_class is None or not hasattr(runner_class, method):
            continue
        if not getattr(getattr(runner_class, method), "__tessera_hook__", False):
            wrap(runner_class)
        hooked.append(f"{module_name}.{class_name}")
    if not hooked:
        logger.warning("tessera: no vLLM model runner found to read prompt lengths from; "
                       "each chunk's end stands in for the prompt's end (denser, not wrong)")
    return hooked
