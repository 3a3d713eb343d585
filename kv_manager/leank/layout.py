"""How one layer's pruned KV is laid out, derived from its mask row (nothing else is stored).

Per token, the K cache row holds the kept channels of every KV head back to back:
``[head 0 kept | head 1 kept | ...]``, ``k_width = sum(kept)`` elements instead of
``kv_heads * head_dim``. The V cache holds only the heads that keep at least one channel
("live" heads). A fully pruned head has all scores zero, so its attention is uniform over
the context and its output is mean(V): a running V sum per sequence replaces its V pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerLayout:
    """Built once per layer from ``keep`` (bool [kv_heads, head_dim])."""

    keep: torch.Tensor

    @property
    def num_kv_heads(self) -> int:
        return int(self.keep.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.keep.shape[1])

    @property
    def k_counts(self) -> torch.Tensor:
        """int32 [kv_heads]: kept channels per head."""
        return self.keep.sum(dim=1).to(torch.int32)

    @property
    def k_offsets(self) -> torch.Tensor:
        """int32 [kv_heads]: where each head's kept channels start in a K cache row."""
        counts = self.k_counts
        return (torch.cumsum(counts, 0) - counts).to(torch.int32)

    @property
    def k_width(self) -> int:
        return int(self.keep.sum())

    @property
    def max_kept(self) -> int:
        return int(self.k_counts.max()) if self.num_kv_heads else 0

    @property
    def kept_index(self) -> torch.Tensor:
        """int32 [kv_heads, head_dim]: head h's kept channel indices, ascending, then padded
        with 0 (readers mask past k_counts[h])."""
        padded = torch.zeros(self.keep.shape, dtype=torch.int32)
        for head, row in enumerate(self.keep):
            idx = torch.nonzero(row).flatten()
            padded[head, : idx.numel()] = idx.to(torch.int32)
        return padded

    @property
    def flat_kept_index(self) -> torch.Tensor:
        """int64 [k_width]: for each K cache column, its index into ``heads * head_dim``."""
        return torch.nonzero(self.keep.flatten()).flatten()

    @property
    def live_heads(self) -> list[int]:
        return [h for h in range(self.num_kv_heads) if bool(self.keep[h].any())]

    @property
    def pruned_heads(self) -> list[int]:
        return [h for h in range(self.num_kv_heads) if not bool(self.keep[h].any())]

    @property
    def v_slot(self) -> torch.Tensor:
        """int32 [kv_heads]: index into the V cache's head axis, -1 for fully pruned heads."""
        slots = torch.full((self.num_kv_heads,), -1, dtype=torch.int32)
        for slot, head in enumerate(self.live_heads):
            slots[head] = slot
        return slots

    @property
    def sum_slot(self) -> torch.Tensor:
        """int32 [kv_heads]: index into the running V sum's head axis, -1 for live heads."""
        slots = torch.full((self.num_kv_heads,), -1, dtype=torch.int32)
        for slot, head in enumerate(self.pruned_heads):
            slots[head] = slot
        return slots

    def bytes_per_token(self, dtype_bytes: int) -> dict[str, int]:
        """K and V bytes per token for this layer, stored vs dense."""
        dense = self.num_kv_heads * self.head_dim * dtype_bytes
        return {"k_dense": dense, "k_stored": self.k_width * dtype_bytes,
                "v_dense": dense, "v_stored": len(self.live_heads) * self.head_dim * dtype_bytes}
