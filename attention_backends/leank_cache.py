"""LeanK inside vLLM's CPU worker: packed KV pages, the pruned write, and attention over them.

Thin glue: the mask, the layout and the attention maths live in ``kv_manager/leank`` and
import no vLLM. What this module owns is vLLM's side of the contract:

- **Page size** (``customize_spec``): one packed row per token and layer,
  ``[kept K of every KV head | V of the live heads | padding]``, stored as a single head slot
  (``num_head_slots=1``, ``state_content_bytes = row_width * dtype_bytes``). vLLM sizes the
  pool from this, so the "KV cache size: N tokens" it logs grows by the saved bytes.
  ``customize_spec`` sees a spec, not a layer, and one KV cache group has one page size, so
  every layer gets the widest layer's row; narrower layers leave their tail unused.
- **Write** (``write``): keys are pruned after RoPE, fully pruned heads' V is not stored;
  instead their V is summed per physical block (``value_block_sum``). A block's sum is a
  function of the tokens in it, so a prefix-cache hit on a full block reuses a correct sum,
  and a block written again from offset 0 (freed and reused, or recomputed) is reset first.
- **Attention** (``forward``): decode rows score the pruned cache on the kept channels
  (query channels gathered); prefill rows attend the chunk's own full keys and read earlier
  chunks / cached prefixes through the pruned cache, densely or under the layer's
  TriangleMix pattern (its per-token mask, whole-prompt last rows included). vLLM's CPU
  kernel never sees these pages: it cannot read them.

The mask comes from ``TESSERA_ATTENTION_LEANK_MASK`` / ``tessera.yaml`` (``attention.leank_mask``)
and is checked against the served model's fingerprint when the first layer is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from attention_backends.policy import ModelFingerprint
from attention_backends.vllm_layers import attention_settings
from attention_backends.worker_metrics import write_kv_bytes
from kv_manager.leank.apply import (
    live_values,
    prefill_over_pruned_prefix,
    prune_keys,
    pruned_decode_attention,
)
from kv_manager.leank.kernels.decode_ref import gather_sequence
from kv_manager.leank.layout import LayerLayout
from kv_manager.leank.mask import LeanKMask, load_mask

logger = init_logger("tessera.leank")


@dataclass(frozen=True)
class ServedLeanK:
    """The served model's mask and what the cache derives from it."""

    mask: LeanKMask

    @functools.cached_property
    def layouts(self) -> list[LayerLayout]:
        return [LayerLayout(self.mask.keep[layer]) for layer in range(self.mask.keep.shape[0])]

    def row_width(self, layer: int) -> int:
        """Elements of one token's packed row in ``layer`` (K kept + V of live heads)."""
        layout = self.layouts[layer]
        return layout.k_width + len(layout.live_heads) * layout.head_dim

    @functools.cached_property
    def page_row_width(self) -> int:
        """The row every layer's page gets: the widest layer's (one page size per group)."""
        return max(self.row_width(layer) for layer in range(len(self.layouts)))

    def kv_bytes_per_token(self, dtype_bytes: int) -> dict[str, int]:
        """K and V bytes per token over all layers: dense, what the mask keeps, and what the
        pages really take (``page``: rows padded to the widest layer)."""
        totals = {"k_dense": 0, "k_stored": 0, "v_dense": 0, "v_stored": 0}
        for layout in self.layouts:
            for key, value in layout.bytes_per_token(dtype_bytes).items():
                totals[key] += value
        totals["page"] = self.page_row_width * dtype_bytes * len(self.layouts)
        return totals


@functools.cache
def served_leank() -> ServedLeanK | None:
    """The mask for the model vLLM is building, or None when LeanK is off. First called from
    an impl's ``__init__`` (the vLLM config is current then); cached for ``customize_spec``."""
    path = attention_settings().leank_mask
    if path is None:
        return None
    model_config = get_current_vllm_config().model_config
    fingerprint = ModelFingerprint.from_hf_config(model_config.hf_text_config)
    # A mask for another model raises MaskMismatchError here and the worker does not start.
    mask = load_mask(path, expect=fingerprint, head_dim=model_config.get_head_size())
    served = ServedLeanK(mask)
    logger.info("tessera LeanK: mask %s (sparsity %.3f, align %d, %d fully pruned heads); "
                "page row %d of %d elements per token and layer", path,
                mask.achieved_sparsity, mask.align, len(mask.fully_pruned_heads()),
                served.page_row_width, 2 * fingerprint.num_kv_heads * mask.head_dim)
    return served


def customize_spec(spec):
    """The backend's ``customize_spec``: pack each token's pruned row into one head slot."""
    served = served_leank() if attention_settings().leank_mask is not None else None
    if served is None or spec.state_content_bytes is not None:
        return spec
    dtype_bytes = torch.tensor([], dtype=spec.dtype).element_size()
    return replace(spec, num_head_slots=1,
                   state_content_bytes=served.page_row_width * dtype_bytes)


class LeanKLayer:
    """One attention layer's LeanK cache: created by the impl, bound to its layer at the
    first call (vLLM passes no layer index to ``__init__``)."""

    def __init__(self, served: ServedLeanK, num_heads: int) -> None:
        self.served = served
        self.num_heads = num_heads
        self.layout: LayerLayout | None = None
        self.layer_index = -1
        # float32 [num_blocks, pruned_heads, head_dim], allocated at the first write.
        self.value_block_sum: torch.Tensor | None = None

    def bind(self, layer) -> LayerLayout:
        if self.layout is None:
            self.layer_index = extract_layer_index(layer.layer_name)
            self.layout = self.served.layouts[self.layer_index]
            self.flat_kept_index = self.layout.flat_kept_index
            self.pruned_heads = torch.tensor(self.layout.pruned_heads, dtype=torch.long)
        return self.layout

    def cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's ``[num_blocks, 1, block_size, page_row]`` page -> K ``[blocks, block_size,
        k_width]`` and V ``[blocks, block_size, live_heads, head_dim]`` views (no copy)."""
        layout = self.layout
        rows = kv_cache[:, 0]
        k_cache = rows[..., : layout.k_width]
        v_width = len(layout.live_heads) * layout.head_dim
        v_cache = rows[..., layout.k_width: layout.k_width + v_width].unflatten(
            -1, (len(layout.live_heads), layout.head_dim))
        return k_cache, v_cache

    def write(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """``do_kv_cache_update``: keys [tokens, kv_heads, d] post-RoPE, pruned on the way in."""
        layout = self.bind(layer)
        slots = slot_mapping.flatten()
        written = slots >= 0  # -1: padding rows vLLM asks us to skip
        slots = slots[written].long()
        key, value = key[: written.numel()][written], value[: written.numel()][written]
        k_cache, v_cache = self.cache_views(kv_cache)
        block_size = kv_cache.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        k_cache[blocks, offsets] = prune_keys(key, layout).to(k_cache.dtype)
        if layout.live_heads:
            v_cache[blocks, offsets] = live_values(value, layout).to(v_cache.dtype)
        if layout.pruned_heads:
            if self.value_block_sum is None:
                self.value_block_sum = torch.zeros(kv_cache.shape[0], len(layout.pruned_heads),
                                                   layout.head_dim, dtype=torch.float32)
            self.value_block_sum[blocks[offsets == 0]] = 0.0
            self.value_block_sum.index_add_(0, blocks, value[:, self.pruned_heads].float())
        write_kv_bytes_once(self.served, kv_cache)

    def prefix_value_sum(self, block_row: torch.Tensor, num_tokens: int,
                         block_size: int) -> torch.Tensor:
        """float32 [pruned_heads, head_dim]: V of the fully pruned heads summed over the
        sequence's blocks that hold its first ``num_tokens`` tokens."""
        layout = self.layout
        if not layout.pruned_heads:
            return torch.zeros(0, layout.head_dim)
        num_blocks = -(-num_tokens // block_size)
        return self.value_block_sum[block_row[:num_blocks].long()].sum(dim=0)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata, output: torch.Tensor,
                pattern=None, prompt_lens=None) -> tuple[int, int]:
        """Fill ``output`` for every sequence of the step; returns (decode rows, prefill rows
        that ran under ``pattern``). ``pattern``: the layer's sparse prefill pattern (its
        ``token_mask``, with each sequence's whole prompt length in ``prompt_lens``), or None
        for dense prefill."""
        layout = self.bind(layer)
        k_cache, v_cache = self.cache_views(kv_cache)
        block_size = kv_cache.shape[2]
        heads_view = output.view(-1, self.num_heads, layout.head_dim)
        starts = metadata.query_start_loc.tolist()
        decode_rows = sparse_rows = 0
        for seq, seq_len in enumerate(metadata.seq_lens.tolist()):
            begin, end = starts[seq], starts[seq + 1]
            if end == begin:
                continue
            block_row = metadata.block_table[seq]
            if end - begin == 1:
                # Decode: its own key is already in the cache, pruned like every other.
                packed = gather_sequence(k_cache, block_row, seq_len)
                live = gather_sequence(v_cache, block_row, seq_len)
                value_sum = self.prefix_value_sum(block_row, seq_len, block_size)
                heads_view[begin] = pruned_decode_attention(
                    query[begin], packed, live, value_sum, layout).to(output.dtype)
                decode_rows += 1
                continue
            prefix = seq_len - (end - begin)
            packed = gather_sequence(k_cache, block_row, prefix)
            live = gather_sequence(v_cache, block_row, prefix)
            # The block sums already hold this chunk (written before attention): take it out.
            value_sum = self.prefix_value_sum(block_row, seq_len, block_size)
            if layout.pruned_heads:
                value_sum = value_sum - value[begin:end, self.pruned_heads].float().sum(0)
            key_mask = None
            if pattern is not None:
                key_mask = pattern.token_mask(torch.arange(prefix, seq_len), torch.arange(seq_len),
                                              int(prompt_lens[seq]))
                sparse_rows += end - begin
            heads_view[begin:end] = prefill_over_pruned_prefix(
                query[begin:end], key[begin:end], value[begin:end], packed, live, value_sum,
                layout, key_mask).to(output.dtype)
        return decode_rows, sparse_rows


def kv_bytes_metrics(served: ServedLeanK, kv_cache: torch.Tensor) -> dict[str, int]:
    """``tessera_kv_bytes{kind, state}`` for the whole pool: the bytes its token capacity
    takes as stored (the real pages) and as a dense cache would need for the same tokens."""
    num_blocks, _, block_size, _ = kv_cache.shape
    tokens = num_blocks * block_size
    per_token = served.kv_bytes_per_token(kv_cache.element_size())
    # The page row's padding counts as K: it exists because K rows differ between layers.
    k_page = per_token["page"] - per_token["v_stored"]
    return {"k_dense": per_token["k_dense"] * tokens, "k_stored": k_page * tokens,
            "v_dense": per_token["v_dense"] * tokens, "v_stored": per_token["v_stored"] * tokens,
            "capacity_tokens": tokens}


_kv_bytes_written = False


def write_kv_bytes_once(served: ServedLeanK, kv_cache: torch.Tensor) -> None:
    """Log the KV bytes once per worker and, with a stats dir, write them there for the
    API server to show as ``tessera_kv_bytes`` (``worker_metrics.py``: metrics made in the
    engine process never reach vLLM's ``/metrics`` by themselves)."""
    global _kv_bytes_written
    if _kv_bytes_written:
        return
    _kv_bytes_written = True
    values = kv_bytes_metrics(served, kv_cache)
    logger.info("tessera LeanK KV bytes: %s", values)
    stats_dir = attention_settings().stats_dir
    if stats_dir is not None:
        write_kv_bytes(stats_dir, values)
