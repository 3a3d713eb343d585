"""Per-(layer, head) pattern configs: one JSON file per model, keyed by its fingerprint.

Format (``FORMAT``)::

    {"format": "tessera-head-patterns/1",
     "fingerprint": {"architecture": ..., "num_layers": ..., ...},   # policy.ModelFingerprint
     "block_size": 64,
     "source": {...},                 # how it was made (search arguments, date, texts)
     "layers": [[{"pattern": "vertical_slash", "params": {...}, "recall": 0.97}, ...], ...]}

``layers[l][h]`` is query head ``h`` of layer ``l`` (global head ids, as MInference's configs;
``recall`` and any other key are informative). TriangleMix is one more pattern (``triangle``),
so "TriangleMix in the deep layers, MInference heads in the shallow ones" is a config, not
code. A file written for another model is refused: its fingerprint must match the served one.
Committed search results live in ``configs/`` and are found by fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attention_backends.patterns.dense import DensePattern
from attention_backends.patterns.minference.heads import (
    HeadPattern,
    LayerHeadPatterns,
    make_head_pattern,
)
from attention_backends.policy import ModelFingerprint

FORMAT = "tessera-head-patterns/1"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class HeadPatternPolicy:
    """The served model's per-(layer, head) patterns; same interface as
    ``LayerPatternPolicy`` for the vLLM glue (``pattern_for_layer``, ``sparse_layers``,
    ``check_layer_count``). A layer whose heads are all dense runs vLLM's dense kernel."""

    fingerprint: ModelFingerprint
    layers: tuple[LayerHeadPatterns, ...]

    def check_layer_count(self, num_layers: int) -> None:
        if len(self.layers) != num_layers:
            raise ValueError(f"head-pattern config has {len(self.layers)} layers, the model "
                             f"{num_layers}: it was written for another model")

    def pattern_for_layer(self, layer_index: int) -> LayerHeadPatterns | DensePattern:
        layer = self.layers[layer_index]
        return DensePattern() if layer.is_dense else layer

    def sparse_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if not self.layers[i].is_dense]

    def to_json(self, source: dict[str, Any] | None = None,
                recalls: list[list[float]] | None = None) -> dict[str, Any]:
        layers = []
        for layer_index, layer in enumerate(self.layers):
            heads = []
            for head_index, head in enumerate(layer.heads):
                entry: dict[str, Any] = {"pattern": head.name, "params": head.params()}
                if recalls is not None:
                    entry["recall"] = round(recalls[layer_index][head_index], 5)
                heads.append(entry)
            layers.append(heads)
        block_size = self.layers[0].block_size if self.layers else 64
        return {"format": FORMAT, "fingerprint": asdict(self.fingerprint),
                "block_size": block_size, "source": source or {}, "layers": layers}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> HeadPatternPolicy:
        if values.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format={values.get('format')!r})")
        fingerprint = ModelFingerprint(**values["fingerprint"])
        block_size = int(values.get("block_size", 64))
        layers = []
        for heads in values["layers"]:
            if len(heads) != fingerprint.num_attention_heads:
                raise ValueError(f"a layer lists {len(heads)} heads, the model has "
                                 f"{fingerprint.num_attention_heads}")
            patterns: tuple[HeadPattern, ...] = tuple(
                make_head_pattern(head["pattern"], **head.get("params", {})) for head in heads)
            layers.append(LayerHeadPatterns(patterns, block_size))
        policy = cls(fingerprint, tuple(layers))
        policy.check_layer_count(fingerprint.num_layers)
        return policy

    @classmethod
    def load(cls, path: Path, served: ModelFingerprint | None = None) -> HeadPatternPolicy:
        """Read a config; with ``served``, refuse one whose fingerprint differs."""
        policy = cls.from_json(json.loads(Path(path).read_text()))
        if served is not None and policy.fingerprint != served:
            raise ValueError(f"{path} was written for {policy.fingerprint}, not the served "
                             f"{served}")
        return policy


def committed_config(fingerprint: ModelFingerprint, config_dir: Path = CONFIG_DIR) -> Path:
    """The committed search result for this model (``configs/*.json`` by fingerprint)."""
    for path in sorted(config_dir.glob("*.json")):
        values = json.loads(path.read_text())
        if values.get("format") == FORMAT and values.get("fingerprint") == asdict(fingerprint):
            return path
    raise FileNotFoundError(f"no head-pattern config for {fingerprint} in {config_dir}; run "
                            "`tessera patterns search --model DIR` or set "
                            "attention.head_patterns_file")


def uniform_policy(fingerprint: ModelFingerprint, pattern_for_layer, block_size: int = 64
                   ) -> HeadPatternPolicy:
    """Every head of layer ``l`` runs ``pattern_for_layer(l)`` (a ``HeadPattern``): e.g. the
    TriangleMix split written as a per-head config."""
    layers = tuple(
        LayerHeadPatterns((pattern_for_layer(layer),) * fingerprint.num_attention_heads,
                          block_size)
        for layer in range(fingerprint.num_layers))
    return HeadPatternPolicy(fingerprint, layers)
