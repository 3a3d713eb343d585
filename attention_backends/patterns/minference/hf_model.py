"""Thin transformers glue for the offline search and the logit-fidelity benchmark: run a
local model in float32 and either record each layer's post-RoPE queries/keys, or replace its
attention with the per-head patterns (the same reference the CPU backend runs).

Uses transformers' attention-function registry, so the model's own code (projections, RoPE,
GQA layout) is untouched: we only see ``query [1, Hq, N, D]`` and ``key [1, Hkv, N, D]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

ATTENTION_NAME = "tessera_head_patterns"


def load_model(model_dir: Path):
    """(model in float32, eval mode, tokenizer) from a local Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def _run_with_attention(model, token_ids: list[int], attention: Callable) -> torch.Tensor:
    """Logits ``[N, vocab]`` with every layer's attention computed by ``attention(layer,
    query [Hq, N, D], key [Hkv, N, D], value [Hkv, N, D], scale) -> [N, Hq, D]``."""
    from transformers import AttentionInterface

    def forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = attention(module.layer_idx, query[0], key[0], value[0], float(scaling))
        return out.unsqueeze(0), None

    AttentionInterface.register(ATTENTION_NAME, forward)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        with torch.no_grad():
            return model(torch.tensor([token_ids])).logits[0]
    finally:
        model.set_attn_implementation(previous)


def _dense(query, key, value, scale) -> torch.Tensor:
    group = query.shape[0] // key.shape[0]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 0), value.repeat_interleave(group, 0),
        is_causal=True, scale=scale)
    return out.transpose(0, 1)


def capture_queries_keys(model, token_ids: list[int]
                         ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per layer: (query ``[Hq, N, D]``, key ``[Hkv, N, D]``, scale), dense forward."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def record(layer, query, key, value, scale):
        captured[layer] = (query.clone(), key.clone(), scale)
        return _dense(query, key, value, scale)

    _run_with_attention(model, token_ids, record)
    return [captured[layer] for layer in sorted(captured)]


def logits_with_policy(model, token_ids: list[int], policy,
                       on_index: Callable[[int, object], None] | None = None) -> torch.Tensor:
    """Logits ``[N, vocab]`` with ``policy`` (``HeadPatternPolicy``: ``pattern_for_layer``)
    applied as a single-shot prefill of the whole text. ``on_index(layer, HeadsIndex)`` sees
    each sparse layer's index (e.g. to measure kept fractions)."""
    from attention_backends.kernels.head_sparse_ref import attend_with_index
    from attention_backends.patterns.minference.index import SequenceChunk

    def attend(layer, query, key, value, scale):
        pattern = policy.pattern_for_layer(layer)
        if pattern.is_dense:
            return _dense(query, key, value, scale)
        rows = query.transpose(0, 1)
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
        positions = torch.arange(rows.shape[0])
        chunk = SequenceChunk(rows, positions, keys, rows.shape[0], scale)
        index = pattern.build_index(chunk)
        if on_index is not None:
            on_index(layer, index)
        return attend_with_index(rows, positions, keys, values, index, scale)

    return _run_with_attention(model, token_ids, attend)
