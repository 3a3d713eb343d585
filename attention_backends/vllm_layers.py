"""Per-layer decisions shared by tessera's CPU and CUDA backends (thin vLLM glue).

Each attention impl asks once, at its first forward, which pattern its layer runs: the
policy's pattern for the layer index (read with vLLM's own ``extract_layer_index``), or
dense when the index cannot be read or the layer needs a feature the sparse kernels lack
(``layer_support``). Each fallback is logged once per layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from attention_backends.config import AttentionSettings
from attention_backends.layer_support import layer_index_or_none, sparse_fallback_reason
from attention_backends.patterns import AttentionPattern, DensePattern
from attention_backends.policy import LayerPatternPolicy, ModelFingerprint
from attention_backends.tensor_parallel import local_heads_pattern
from attention_backends.usage import AttentionUsage

logger = init_logger("tessera.layers")


@functools.cache
def attention_settings() -> AttentionSettings:
    return AttentionSettings()


@functools.cache
def attention_usage(backend_name: str) -> AttentionUsage:
    return AttentionUsage(attention_settings().stats_dir, backend_name)


@functools.cache
def _policy_for(fingerprint: ModelFingerprint) -> LayerPatternPolicy:
    policy = attention_settings().layer_policy(fingerprint)
    policy.check_layer_count(fingerprint.num_layers)  # a split for another model stops here
    logger.info("tessera attention: method=%s, sparse layers %s of %d (%s)",
                attention_settings().method, policy.sparse_layers(fingerprint.num_layers),
                fingerprint.num_layers, fingerprint)
    return policy


@dataclass(frozen=True)
class ServedModel:
    policy: LayerPatternPolicy
    num_layers: int


def served_model() -> ServedModel:
    """The policy for the model vLLM is building (call from an impl's ``__init__``)."""
    model_config = get_current_vllm_config().model_config
    fingerprint = ModelFingerprint.from_hf_config(model_config.hf_text_config)
    return ServedModel(_policy_for(fingerprint), fingerprint.num_layers)


def layer_pattern(
    impl, layer_name: str, policy: LayerPatternPolicy
) -> tuple[int, AttentionPattern]:
    """(layer index or -1, the pattern this layer's prefill runs). ``impl`` is vLLM's
    attention impl of the layer (CPU or FlashAttention): its features decide fallbacks."""
    index = layer_index_or_none(layer_name, extract_layer_index)
    if index is None:
        logger.warning("tessera attention: no layer index in %r; the layer runs dense",
                       layer_name)
        return -1, DensePattern()
    pattern = policy.pattern_for_layer(index)
    if pattern.is_dense:
        return index, pattern
    reason = sparse_fallback_reason(
        is_decoder=impl.attn_type == "decoder",
        sliding_window=getattr(impl, "sliding_window", None),
        alibi_slopes=getattr(impl, "alibi_slopes", None),
        logits_soft_cap=getattr(impl, "logits_soft_cap", None),
        sinks=getattr(impl, "sinks", None),
        kv_cache_dtype=getattr(impl, "kv_cache_dtype", "auto"),
    )
    if reason is None and getattr(impl, "dcp_world_size", 1) > 1:
        reason = "decode context parallelism"
    if reason is not None:
        logger.warning("tessera attention: layer %d (%s) runs dense: %s not supported by "
                       "the %s kernels", index, layer_name, reason, pattern.name)
        return index, DensePattern()
    return index, pattern


class PerLayerPattern:
    """Mixin of tessera's CPU and CUDA attention impls: the served model's policy, the
    layer's pattern decided at its first forward, and its usage counts."""

    def init_per_layer(self) -> None:
        served = served_model()  # vLLM's config is current while the model is built
        self.policy = served.policy
        self.last_layer_index = served.num_layers - 1
        self.layer_index: int | None = None
        self.pattern: AttentionPattern | None = None

    def layer_pattern_of(self, layer) -> AttentionPattern:
        if self.pattern is None:
            index, pattern = layer_pattern(self, layer.layer_name, self.policy)
            # Under tensor parallelism this impl holds its rank's heads only (num_heads is
            # local): a per-head pattern is cut to them.
            self.layer_index, self.pattern = index, local_heads_pattern(pattern, self.num_heads)
        return self.pattern

    def record_sparse_prefill(self, usage: AttentionUsage, prefill) -> None:
        """Rows of a sparse prefill, and how many of them ran as full last rows."""
        pattern = self.pattern
        usage.record(self.layer_index, pattern.name, int(prefill.query_lens_host.sum()))
        usage.record(self.layer_index, f"{pattern.name}_last_rows",
                     prefill.rows_in_last(getattr(pattern, "last_q_tokens", 0)))

    def end_step_if_last(self, usage: AttentionUsage) -> None:
        if self.layer_index == self.last_layer_index:
            if usage.num_heads is None:  # the snapshot says which heads this rank ran
                usage.set_local_heads(self.num_heads, self.num_kv_heads)
            usage.end_step()
