"""Prompt lengths published by the model runner reach the builder only for their own batch."""

from __future__ import annotations

import numpy as np
import pytest

from attention_backends import prompt_lengths


@pytest.fixture(autouse=True)
def _nothing_published():
    prompt_lengths.clear()
    yield
    prompt_lengths.clear()


def test_matching_batch_gets_the_published_prompt_lengths() -> None:
    prompt_lengths.publish(np.array([0, 2048, 2049]), np.array([6000, 300]))
    lens = prompt_lengths.prompt_lens_for_batch(np.array([0, 2048, 2049]), np.array([2048, 300]))
    assert lens.tolist() == [6000, 300]


def test_other_batch_falls_back_to_its_sequence_lengths() -> None:
    prompt_lengths.publish(np.array([0, 2048]), np.array([6000]))
    lens = prompt_lengths.prompt_lens_for_batch(np.array([0, 16]), np.array([16]))
    assert lens.tolist() == [16]


def test_nothing_published_falls_back_to_sequence_lengths() -> None:
    assert prompt_lengths.prompt_lens_for_batch(np.array([0, 5]), np.array([9])).tolist() == [9]


def test_padded_batch_keeps_padding_at_its_sequence_length() -> None:
    prompt_lengths.publish(np.array([0, 1]), np.array([40]))
    lens = prompt_lengths.prompt_lens_for_batch(np.array([0, 1, 1, 1]), np.array([40, 0, 0]))
    assert lens.tolist() == [40, 0, 0]


def test_prompt_length_is_never_below_the_sequence_length() -> None:
    # V1 runner after a preemption: the re-prefill includes generated tokens
    prompt_lengths.publish(np.array([0, 100]), np.array([60]))
    lens = prompt_lengths.prompt_lens_for_batch(np.array([0, 100]), np.array([100]))
    assert lens.tolist() == [100]


def test_hooks_wrap_the_runner_classes_once() -> None:
    class FakeRunner:  # the V2 runner's contract: prepare_inputs returns the step's batch
        def prepare_inputs(self, *_):
            from types import SimpleNamespace
            return SimpleNamespace(num_reqs=1, query_start_loc_np=np.array([0, 7, 7]),
                                   prefill_len_np=np.array([900, 0]))

    import sys
    import types
    module = types.ModuleType("vllm.v1.worker.gpu.model_runner")
    module.GPUModelRunner = FakeRunner
    saved = sys.modules.get(module.__name__)
    sys.modules[module.__name__] = module
    try:
        hooked = prompt_lengths.install_runner_hooks()
        assert "vllm.v1.worker.gpu.model_runner.GPUModelRunner" in hooked
        wrapped = FakeRunner.prepare_inputs
        prompt_lengths.install_runner_hooks()
        assert FakeRunner.prepare_inputs is wrapped  # idempotent
        FakeRunner().prepare_inputs()
        lens = prompt_lengths.prompt_lens_for_batch(np.array([0, 7]), np.array([7]))
        assert lens.tolist() == [900]
    finally:
        if saved is None:
            del sys.modules[module.__name__]
        else:
            sys.modules[module.__name__] = saved
