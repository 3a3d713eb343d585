"""One sequence's RetroInfer state for one layer, across decode steps (paper sec. 4.1, 4.3).

After the prefill, the prompt's middle is indexed; the steady zone is the prompt's first
``sink_tokens`` and last ``recent_tokens`` plus the generated tokens not yet indexed. Each
decode step appends its token's K/V; once ``update_tokens`` generated tokens have accumulated
they leave the steady zone as one new segment of ``update_clusters`` clusters (the official
code's update), so the steady zone and the exact work per step stay bounded. The budget is
re-derived from the fractions on the grown cluster count (1.8% of 64 new clusters = +1
retrieved, 23.2% = +15 estimated, as the official code adds).
"""

from __future__ import annotations

import torch

from kv_manager.retroinfer.attention import DecodeResult, retroinfer_decode
from kv_manager.retroinfer.config import DecodeBudget, WaveIndexConfig
from kv_manager.retroinfer.wave_index import build_wave_index, extend_wave_index


class LayerSequenceState:
    """Index + steady zone of one layer of one sequence. Tensors [tokens, H, d]."""

    def __init__(
        self,
        prompt_keys: torch.Tensor,
        prompt_values: torch.Tensor,
        config: WaveIndexConfig | None = None,
    ) -> None:
        self.config = config or WaveIndexConfig()
        prompt = prompt_keys.shape[0]
        if not self.config.uses_index(prompt):
            raise ValueError(f"a {prompt}-token prompt is too short for the index")
        self.index = build_wave_index(prompt_keys, prompt_values, self.config)
        sink, recent = self.config.sink_tokens, self.config.recent_tokens
        self.fixed_keys = torch.cat([prompt_keys[:sink], prompt_keys[prompt - recent :]])
        self.fixed_values = torch.cat([prompt_values[:sink], prompt_values[prompt - recent :]])
        self.generated_keys = prompt_keys[:0]
        self.generated_values = prompt_values[:0]
        self.length = prompt
        self.updates = 0

    @property
    def generated_pending(self) -> int:
        return self.generated_keys.shape[0]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add one generated token's K/V [H, d]; index the pending ones when enough."""
        self.generated_keys = torch.cat([self.generated_keys, key.unsqueeze(0)])
        self.generated_values = torch.cat([self.generated_values, value.unsqueeze(0)])
        self.length += 1
        if self.generated_pending >= self.config.update_tokens:
            first = self.length - self.generated_pending
            self.index = extend_wave_index(
                self.index, self.generated_keys, self.generated_values, first, self.config
            )
            self.generated_keys = self.generated_keys[:0]
            self.generated_values = self.generated_values[:0]
            self.updates += 1

    def budget(self) -> DecodeBudget:
        return DecodeBudget.for_index(self.index.num_clusters, self.index.num_tokens, self.config)

    def decode(
        self, query: torch.Tensor, budget: DecodeBudget | None = None, scale: float | None = None
    ) -> DecodeResult:
        """Attention of this step's query [H, G, d] over every token so far (the new token's
        K/V must have been appended first, as a cache write precedes attention)."""
        steady_keys = torch.cat([self.fixed_keys, self.generated_keys]).transpose(0, 1)
        steady_values = torch.cat([self.fixed_values, self.generated_values]).transpose(0, 1)
        return retroinfer_decode(
            query.unsqueeze(0),
            self.index,
            steady_keys,
            steady_values,
            budget or self.budget(),
            scale,
        )
