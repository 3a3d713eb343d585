"""The per-head sparse index every MInference-family pattern builds: one definition, per token.

For one sequence of ``num_tokens`` keys and ``H`` query heads, head ``h`` keeps the causal pair
(query position ``q``, key position ``k``) iff

    k <= q  and  ( columns[h, k]                      # verticals, sink columns, grid columns
                   or diagonals[h, q - k]              # slashes, the local band
                   or full_rows[h, q]                  # TriangleMix last rows, grid rows, dense
                   or blocks[h, q // B, k // B] )      # block-sparse tiles, B = block_size

Every pattern of MInference (A-shape, vertical-slash, block-sparse), TriangleMix (A-shape plus
the last rows) and MMInference's grid is a choice of these four sets, so one reference, one
test oracle and (next) one GPU kernel serve them all. The index is per token, like TriangleMix's
(``attention_backends/README.md``, "the mask is per token"): a kernel may tile it however it
likes but must compute exactly this function. MInference's own kernels widen each slash to a
64-key tile per query block; that is a kernel-side superset we do not copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadsIndex:
    """Kept pairs of ``H`` heads over one sequence of ``num_tokens`` positions (all bool).

    columns ``[H, N]`` (key positions), diagonals ``[H, N]`` (offsets ``q - k``), full_rows
    ``[H, N]`` (query positions), blocks ``[H, ceil(N/B), ceil(N/B)]`` (query block, key block).
    """

    columns: torch.Tensor
    diagonals: torch.Tensor
    full_rows: torch.Tensor
    blocks: torch.Tensor
    block_size: int

    @property
    def num_heads(self) -> int:
        return int(self.columns.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.columns.shape[1])

    @classmethod
    def empty(cls, num_heads: int, num_tokens: int, block_size: int,
              device: torch.device | str | None = None) -> HeadsIndex:
        """Nothing kept (a pattern then sets what it keeps)."""
        num_blocks = -(-num_tokens // block_size)
        flags = lambda *shape: torch.zeros(*shape, dtype=torch.bool, device=device)  # noqa: E731
        return cls(flags(num_heads, num_tokens), flags(num_heads, num_tokens),
                   flags(num_heads, num_tokens), flags(num_heads, num_blocks, num_blocks),
                   block_size)

    @classmethod
    def stack(cls, heads: list[HeadsIndex]) -> HeadsIndex:
        """Concatenate single- (or multi-) head indices of the same sequence along heads."""
        sizes = {(h.num_tokens, h.block_size) for h in heads}
        if len(sizes) != 1:
            raise ValueError(f"heads disagree on (num_tokens, block_size): {sorted(sizes)}")
        return cls(
            torch.cat([h.columns for h in heads]), torch.cat([h.diagonals for h in heads]),
            torch.cat([h.full_rows for h in heads]), torch.cat([h.blocks for h in heads]),
            heads[0].block_size,
        )

    def keep_mask(self, query_positions: torch.Tensor, num_keys: int | None = None) -> torch.Tensor:
        """Bool ``[H, R, K]``: the definition above for query positions ``[R]`` (int64) and
        keys ``0 .. K-1`` (default: every key of the index)."""
        num_keys = self.num_tokens if num_keys is None else num_keys
        device = self.columns.device
        query_positions = query_positions.to(device)
        query = query_positions.long()[:, None]
        key = torch.arange(num_keys, device=device)[None, :]
        offsets = query - key  # [R, K]
        causal = offsets >= 0
        keep = self.diagonals[:, offsets.clamp(min=0)]  # [H, R, K]
        keep |= self.columns[:, None, :num_keys]
        keep |= self.full_rows[:, query_positions.long()][:, :, None]
        size = self.block_size
        query_blocks = query_positions.long() // size
        key_blocks = torch.arange(num_keys, device=device) // size
        keep |= self.blocks[:, query_blocks][:, :, key_blocks]
        return keep & causal

    def causal_tile_fraction(self, tile: int = 64) -> torch.Tensor:
        """Float ``[H]``: share of causal ``tile x tile`` tiles holding at least one kept
        pair (what a tiled kernel must visit; diagonal tiles count whole), for a fresh
        prefill of the whole sequence. Built row block by row block: O(tile x N) memory."""
        num_tiles = -(-self.num_tokens // tile)
        device = self.columns.device
        touched = torch.zeros(self.num_heads, device=device)
        for query_tile in range(num_tiles):
            rows = torch.arange(query_tile * tile, min((query_tile + 1) * tile, self.num_tokens),
                                device=device)
            keep = self.keep_mask(rows, num_keys=int(rows[-1]) + 1)  # [H, R, K]
            per_key = keep.any(dim=1)  # [H, K]
            width = (query_tile + 1) * tile
            padded = torch.nn.functional.pad(per_key, (0, width - per_key.shape[1]))
            touched += padded.view(self.num_heads, query_tile + 1, tile).any(dim=2).sum(dim=1)
        return touched / (num_tiles * (num_tiles + 1) / 2)

    def kept_fraction(self) -> torch.Tensor:
        """Float ``[H]``: kept pairs over causal pairs, fresh prefill of the whole sequence."""
        device = self.columns.device
        kept = torch.zeros(self.num_heads, device=device)
        for start in range(0, self.num_tokens, 256):
            rows = torch.arange(start, min(start + 256, self.num_tokens), device=device)
            kept += self.keep_mask(rows).sum(dim=(1, 2)).float()
        return kept / (self.num_tokens * (self.num_tokens + 1) / 2)


@dataclass(frozen=True)
class SequenceChunk:
    """What a pattern may look at to build its index: one sequence's rows of this step.

    query ``[R, Hq, D]`` (this step's rows, positions ``query_positions`` int64 ``[R]``,
    consecutive, ending at ``num_tokens - 1``); keys ``[N, Hkv, D]`` (every key up to this
    step's end, token order); prompt_len: the whole prompt (>= N when this is an early chunk).
    """

    query: torch.Tensor
    query_positions: torch.Tensor
    keys: torch.Tensor
    prompt_len: int
    scale: float

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[0])

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return int(self.query.shape[1]) // int(self.keys.shape[1])

    def head_queries(self, heads: list[int]) -> torch.Tensor:
        """``[h, R, D]`` float32 queries of the given query heads."""
        return self.query[:, heads].float().permute(1, 0, 2)

    def head_keys(self, heads: list[int]) -> torch.Tensor:
        """``[h, N, D]`` float32 keys of the KV head each given query head reads."""
        kv_heads = [head // self.group for head in heads]
        return self.keys[:, kv_heads].float().permute(1, 0, 2)
