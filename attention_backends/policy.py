"""Which attention pattern each layer uses during prefill.

TriangleMix keeps the shallow layers dense and runs the triangle pattern in the deep ones
(the paper's split for Llama-3.1-8B: dense below layer 16). Either give the count of leading
dense layers, or an explicit list of dense layer indices (the paper's v2 allows any subset).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from attention_backends.patterns import (
    PAPER_DENSE_FIRST_LAYERS,
    AttentionPattern,
    DensePattern,
    TrianglePattern,
)


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a model's architecture for a measured split: the served name does
    not (one model can be served under any name, and two names can be one model)."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelFingerprint:
        """From a transformers config object (vLLM's ``model_config.hf_text_config``)."""
        architectures = getattr(config, "architectures", None) or ["?"]
        heads = int(config.num_attention_heads)
        return cls(
            architecture=str(architectures[0]),
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_attention_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            vocab_size=int(config.vocab_size),
        )

    @classmethod
    def from_config_json(cls, path: Path) -> ModelFingerprint:
        """From a model directory's ``config.json`` (no transformers import)."""
        values = json.loads(Path(path).read_text())
        return cls.from_hf_config(SimpleNamespace(**values))


# SmolLM2-135M (base and instruct share this config).
SMOLLM2_135M = ModelFingerprint("LlamaForCausalLM", 30, 576, 9, 3, 49152)

# Splits measured by benchmarks/trianglemix_fidelity.py, keyed by the model's fingerprint:
# the smallest dense_first_layers whose logit fidelity meets the split rule and whose task
# suite loses no case that dense gets right (benchmarks/trianglemix_NOTES.md). SmolLM2's
# layers 15-21 carry long-range copying, so the paper's 16 would cost it fidelity.
MEASURED_DENSE_FIRST_LAYERS: dict[ModelFingerprint, int] = {SMOLLM2_135M: 24}


def default_dense_first_layers(fingerprint: ModelFingerprint | None) -> int:
    """The measured split for this model, else the paper's (Llama-3.1-8B: 16)."""
    if fingerprint is None:
        return PAPER_DENSE_FIRST_LAYERS
    return MEASURED_DENSE_FIRST_LAYERS.get(fingerprint, PAPER_DENSE_FIRST_LAYERS)


@dataclass(frozen=True)
class LayerPatternPolicy:
    """Dense for ``dense_layers`` (explicit indices) if given, else for the first
    ``dense_first_layers`` layers; ``sparse_pattern`` for every other layer."""

    sparse_pattern: AttentionPattern = field(default_factory=TrianglePattern)
    dense_first_layers: int = PAPER_DENSE_FIRST_LAYERS
    dense_layers: frozenset[int] | None = None
    dense_pattern: AttentionPattern = field(default_factory=DensePattern)

    def __post_init__(self) -> None:
        if self.dense_first_layers < 0:
            raise ValueError("dense_first_layers must be >= 0")
        if self.dense_layers is not None:
            # accept any iterable of ints from config code, store it immutable
            object.__setattr__(self, "dense_layers", frozenset(int(i) for i in self.dense_layers))

    @classmethod
    def from_values(
        cls,
        pattern: str = "triangle",
        dense_first_layers: int = PAPER_DENSE_FIRST_LAYERS,
        dense_layers: Iterable[int] | None = None,
        **pattern_params: int,
    ) -> LayerPatternPolicy:
        """Build from plain config values, e.g. ``from_values("triangle", 16, sink_tokens=8)``."""
        from attention_backends.patterns import make_pattern

        return cls(
            sparse_pattern=make_pattern(pattern, **pattern_params),
            dense_first_layers=dense_first_layers,
            dense_layers=None if dense_layers is None else frozenset(dense_layers),
        )

    def check_layer_count(self, num_layers: int) -> None:
        """Refuse a split that does not fit the served model (checked at worker start):
        explicit dense indices past the last layer, or a leading-dense count above the
        layer count, mean the configuration was written for another model."""
        if self.dense_layers is not None:
            outside = sorted(i for i in self.dense_layers if not 0 <= i < num_layers)
            if outside:
                raise ValueError(
                    f"attention.dense_layers {outside} lie outside the model's {num_layers} "
                    "layers: this configuration was written for another model"
                )
        elif self.dense_first_layers > num_layers and not self.sparse_pattern.is_dense:
            raise ValueError(
                f"attention.dense_first_layers={self.dense_first_layers} exceeds the model's "
                f"{num_layers} layers: no layer would be sparse (use method: dense)"
            )

    def sparse_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers that run the sparse pattern in a model of that depth."""
        return [i for i in range(num_layers) if not self.is_dense_layer(i)]

    def is_dense_layer(self, layer_index: int) -> bool:
        if self.dense_layers is not None:
            return layer_index in self.dense_layers
        return layer_index < self.dense_first_layers

    def pattern_for_layer(self, layer_index: int) -> AttentionPattern:
        """The pattern of layer ``layer_index`` (0-based)."""
        return self.dense_pattern if self.is_dense_layer(layer_index) else self.sparse_pattern
