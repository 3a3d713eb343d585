"""Which attention pattern each layer uses during prefill.

TriangleMix keeps the shallow layers dense and runs the triangle pattern in the deep ones
(the paper's split for Llama-3.1-8B: dense below layer 16). Either give the count of leading
dense layers, or an explicit list of dense layer indices (the paper's v2 allows any subset).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from attention_backends.patterns import (
    PAPER_DENSE_FIRST_LAYERS,
    AttentionPattern,
    DensePattern,
    TrianglePattern,
)

# Splits measured on served models by benchmarks/trianglemix_fidelity.py, keyed by served
# model name: the smallest dense_first_layers whose logit fidelity meets the split rule and
# whose task suite loses no case that dense gets right (benchmarks/trianglemix_NOTES.md).
# SmolLM2's layers 15-21 carry long-range copying, so the paper's 16 would cost it fidelity.
MEASURED_DENSE_FIRST_LAYERS: dict[str, int] = {"smollm2-135m-instruct": 24}


def default_dense_first_layers(served_model_name: str | None) -> int:
    """The measured split for this served model, else the paper's (Llama-3.1-8B: 16)."""
    return MEASURED_DENSE_FIRST_LAYERS.get(served_model_name or "", PAPER_DENSE_FIRST_LAYERS)


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

    def is_dense_layer(self, layer_index: int) -> bool:
        if self.dense_layers is not None:
            return layer_index in self.dense_layers
        return layer_index < self.dense_first_layers

    def pattern_for_layer(self, layer_index: int) -> AttentionPattern:
        """The pattern of layer ``layer_index`` (0-based)."""
        return self.dense_pattern if self.is_dense_layer(layer_index) else self.sparse_pattern
