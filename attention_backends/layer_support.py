"""Which attention layers the sparse path may run, decided once per layer (no vLLM import).

The sparse-prefill kernels implement causal softmax attention with one scale, over a bf16/
fp16/fp32 KV cache. A layer that needs anything else (a sliding window, ALiBi, a logit
softcap, learned attention sinks, an fp8 cache, encoder or cross attention), or whose index
in the model cannot be read from its name, runs dense: slower, never miscomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

UNQUANTIZED_CACHE_DTYPES = frozenset({"auto", "bfloat16", "float16", "half", "float32", "float"})


def layer_index_or_none(layer_name: str, extract: Callable[[str], int]) -> int | None:
    """The layer's index by vLLM's own helper (``extract_layer_index``), or None when the
    name holds no single index (``model.norm``, ``layers.1.experts.2.attn``)."""
    try:
        return int(extract(layer_name))
    except (AssertionError, ValueError, IndexError):
        return None


def _has_window(sliding_window: Any) -> bool:
    if sliding_window is None:
        return False
    if isinstance(sliding_window, tuple | list):  # vLLM's (left, right); (-1, -1) = none
        return any(int(side) >= 0 for side in sliding_window)
    return int(sliding_window) > 0


def sparse_fallback_reason(
    *,
    is_decoder: bool,
    sliding_window: Any = None,
    alibi_slopes: Any = None,
    logits_soft_cap: float | None = None,
    sinks: Any = None,
    kv_cache_dtype: str = "auto",
) -> str | None:
    """Why this layer must run dense (a short phrase for the one warning), or None."""
    if not is_decoder:
        return "not decoder self-attention (encoder / cross attention)"
    if _has_window(sliding_window):
        return f"sliding window {sliding_window}"
    if alibi_slopes is not None:
        return "ALiBi slopes"
    if logits_soft_cap:
        return f"logit softcap {logits_soft_cap}"
    if sinks is not None:
        return "learned attention sinks"
    if str(kv_cache_dtype) not in UNQUANTIZED_CACHE_DTYPES:
        return f"KV cache dtype {kv_cache_dtype}"
    return None
