"""Which layers may run sparse: index from vLLM's own helper, unsupported features dense."""

from __future__ import annotations

import pytest
from vllm.model_executor.models.utils import extract_layer_index

from attention_backends.layer_support import layer_index_or_none, sparse_fallback_reason


@pytest.mark.parametrize(("name", "index"), [
    ("model.layers.0.self_attn.attn", 0),
    ("model.layers.17.self_attn.attn", 17),
    ("language_model.model.layers.29.self_attn.attn", 29),
    ("transformer.h.5.attn.attn", 5),  # GPT-2 / Falcon naming
    ("blocks.3.attn", 3),
])
def test_layer_index_comes_from_vllms_helper(name: str, index: int) -> None:
    assert layer_index_or_none(name, extract_layer_index) == index


@pytest.mark.parametrize("name", ["model.norm.attn", "layers.1.experts.2.attn"])
def test_name_without_one_index_gives_none_not_a_crash(name: str) -> None:
    assert layer_index_or_none(name, extract_layer_index) is None


def test_plain_decoder_layer_may_run_sparse() -> None:
    assert sparse_fallback_reason(is_decoder=True, sliding_window=(-1, -1),
                                  logits_soft_cap=0, kv_cache_dtype="auto") is None
    assert sparse_fallback_reason(is_decoder=True, sliding_window=-1,
                                  kv_cache_dtype="bfloat16") is None


@pytest.mark.parametrize(("features", "reason"), [
    ({"is_decoder": False}, "encoder"),
    ({"is_decoder": True, "sliding_window": 4096}, "sliding window"),
    ({"is_decoder": True, "sliding_window": (4095, 0)}, "sliding window"),
    ({"is_decoder": True, "alibi_slopes": [0.5]}, "ALiBi"),
    ({"is_decoder": True, "logits_soft_cap": 50.0}, "softcap"),
    ({"is_decoder": True, "sinks": object()}, "sinks"),
    ({"is_decoder": True, "kv_cache_dtype": "fp8_e4m3"}, "fp8"),
])
def test_unsupported_feature_falls_back_to_dense(features: dict, reason: str) -> None:
    assert reason in sparse_fallback_reason(**features)


class _Impl:
    """The attributes vLLM's CPU and FlashAttention impls carry, set as a plain layer has."""

    attn_type = "decoder"
    sliding_window = (-1, -1)
    alibi_slopes = None
    logits_soft_cap = 0
    sinks = None
    kv_cache_dtype = "auto"


def test_glue_runs_a_plain_deep_layer_sparse_and_a_windowed_one_dense() -> None:
    from attention_backends.policy import LayerPatternPolicy
    from attention_backends.vllm_layers import layer_pattern

    policy = LayerPatternPolicy.from_values("triangle", dense_first_layers=2)
    assert layer_pattern(_Impl(), "transformer.h.3.attn", policy)[1].name == "triangle"
    assert layer_pattern(_Impl(), "transformer.h.1.attn", policy)[1].is_dense
    windowed = _Impl()
    windowed.sliding_window = (4095, 0)
    assert layer_pattern(windowed, "model.layers.5.self_attn.attn", policy)[1].is_dense
    index, pattern = layer_pattern(_Impl(), "model.norm.attn", policy)
    assert index == -1 and pattern.is_dense
