"""Attention settings for the workers: `tessera.yaml` section `attention`, `TESSERA_ATTENTION_*`.

vLLM gives plugins no config argument, so every worker process reads these itself; the
launcher passes `TESSERA_CONFIG` (and any overrides) through the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from tessera_config import TesseraSettings


class AttentionSettings(TesseraSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_ATTENTION_", extra="ignore")
    yaml_section: ClassVar[str] = "attention"

    method: Literal["dense", "trianglemix", "minference"] = Field(
        "dense", description="Prefill attention: plain dense, TriangleMix in the deep layers, "
        "or per-(layer, head) patterns from a config (MInference; TriangleMix heads allowed).",
    )  # fmt: skip
    head_patterns_file: Path | None = Field(
        None, description="minference: per-(layer, head) pattern JSON; unset: the committed "
        "search result for the served model (attention_backends/patterns/minference/configs).",
    )  # fmt: skip
    dense_first_layers: int | None = Field(
        None, ge=0,
        description="TriangleMix: layers [0, N) stay dense (ignored if dense_layers); unset: "
        "the split measured for the served model, else the paper's 16.",
    )  # fmt: skip
    dense_layers: Annotated[list[int] | None, NoDecode] = Field(
        None, description="TriangleMix: explicit dense layer indices (comma separated in env)."
    )
    sink_tokens: int = Field(8, ge=0, description="TriangleMix: leading tokens every query sees.")
    window_tokens: int = Field(512, ge=1, description="TriangleMix: local window per query.")
    last_q_tokens: int = Field(
        128, ge=0, description="TriangleMix: final prompt rows that attend densely."
    )
    kernel_overlap_last_rows: bool = Field(
        False, description="TriangleMix GPU kernel: last-q rows on a high-priority side "
        "stream, overlapped with the streaming rows (off: one stream, one after the other). "
        "Off by default: a server that uses the side stream replays vLLM's decode graphs "
        "~3% slower (no kernel overlap at graph boundaries; gpu_itl_variants.json, "
        "2026-12-01), and the overlap saves well under 1% of TTFT.",
    )  # fmt: skip
    kernel_streaming: Literal["auto", "triton"] = Field(
        "auto", description="TriangleMix GPU kernel for the streaming rows: auto (Gluon on "
        "Hopper when the cache allows, else Triton) or always the Triton kernel.",
    )  # fmt: skip
    leank_mask: Path | None = Field(
        None, description="LeanK K-channel mask for the served model (kv_manager/leank); set: "
        "the KV cache pages hold pruned K and decode reads them. A mask trained for another "
        "model stops the worker at start.",
    )  # fmt: skip
    stats_dir: Path | None = Field(
        None, description="If set, each worker writes per-layer attention path counts here."
    )
    retroinfer_min_tokens: int = Field(
        0, ge=0, description="RetroInfer decode (CPU worker) for sequences with at least this "
        "many tokens before the new one; 0: off. Needs >= 1092 tokens (sink 4 + recent 64 + "
        "1024 indexed) to take effect.",
    )  # fmt: skip
    retroinfer_min_exact_tokens: int = Field(
        2048, ge=0, description="RetroInfer: the exact (retrieval) tier is at least this many "
        "tokens' worth of clusters; 0: only the fraction (0.018 of 4-7K tokens is 64-128). "
        "2048: chosen by benchmarks/retroinfer_fidelity.py (NOTES); below 0.018 of 128K.",
    )  # fmt: skip
    retroinfer_retrieval_fraction: float = Field(
        0.018, ge=0, le=1, description="RetroInfer: fraction of clusters attended exactly."
    )
    retroinfer_estimation_fraction: float = Field(
        0.232, ge=0, le=1, description="RetroInfer: fraction of clusters estimated from "
        "their centroids (after the retrieved ones).",
    )  # fmt: skip

    @field_validator("dense_layers", mode="before")
    @classmethod
    def _split_indices(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(item) for item in value.split(",") if item.strip()]
        return value

    def retroinfer_config(self):  # -> WaveIndexConfig
        """The wave-index settings for RetroInfer decode (the official defaults otherwise)."""
        from kv_manager.retroinfer.config import WaveIndexConfig

        return WaveIndexConfig(
            retrieval_fraction=self.retroinfer_retrieval_fraction,
            estimation_fraction=self.retroinfer_estimation_fraction,
            min_exact_tokens=self.retroinfer_min_exact_tokens,
        )

    def layer_policy(self, fingerprint=None):  # -> LayerPatternPolicy
        """The per-layer policy for the served model (``ModelFingerprint`` or None); an
        unset split takes the one measured for that model, else the paper's."""
        # (import kept lazy: torch is heavy)
        from attention_backends.policy import LayerPatternPolicy, default_dense_first_layers

        if self.method == "dense":
            return LayerPatternPolicy.from_values("dense", dense_first_layers=0)
        if self.method == "minference":
            from attention_backends.patterns.minference.policy import (
                HeadPatternPolicy,
                committed_config,
            )

            if fingerprint is None and self.head_patterns_file is None:
                raise ValueError("method minference needs the served model or a config file")
            path = self.head_patterns_file or committed_config(fingerprint)
            return HeadPatternPolicy.load(path, fingerprint)
        return LayerPatternPolicy.from_values(
            "triangle",
            dense_first_layers=(
                default_dense_first_layers(fingerprint)
                if self.dense_first_layers is None
                else self.dense_first_layers
            ),
            dense_layers=self.dense_layers,
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
            last_q_tokens=self.last_q_tokens,
        )
