"""Would GQA-packed programs do less work than per-head ones? Tile counts, no timing.

A GQA-packed program serves the ``G`` query heads of one KV head: its rows are ``G``
heads x ``strip`` positions (default ``64 / G``: 64 rows), and it visits the union of the
key tiles those heads need for the strip, so every K/V tile it loads serves all ``G`` heads.
Its tensor-core work is (KV heads x strips x union tiles x rows / 64); the per-head
kernel's is (query heads x 64-row query tiles x tiles). This probe counts both on
``minference_kernel.py``'s inputs (``structured_qkv``, where the heads of a group share one
direction, so their patterns overlap by construction)
and, as a control, on groups made of heads from different KV groups (patterns as
independent as these inputs allow). Listed tiles only (gathered columns are < 1% of the
work, minference_kernel.json).

    .venv/bin/python benchmarks/minference_gqa_union_probe.py --tokens 32768 \\
        --out benchmarks/results/minference_gqa_union_probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends.kernels.head_sparse_plan import column_tiles  # noqa: E402
from attention_backends.kernels.head_sparse_triton import estimate_index  # noqa: E402
from attention_backends.patterns.minference import HeadsIndex  # noqa: E402
from benchmarks.minference_kernel import (  # noqa: E402
    LLAMA_8B,
    layer_configs,
    make_paged_kv,
    structured_qkv,
)


def strip_touched(index: HeadsIndex, strip: int) -> torch.Tensor:
    """Bool ``[H, Qt, tile // strip, Kt]``: key tiles that rows ``64 qt + strip j ..
    + strip - 1`` of each head need (``touched_tiles`` at strip granularity)."""
    tile, num_heads, num_tokens = index.block_size, index.num_heads, index.num_tokens
    num_tiles = -(-num_tokens // tile)
    tiles = torch.arange(num_tiles)
    distance = tiles[:, None] - tiles[None, :]  # [Qt, Kt]
    causal = distance >= 0
    prefix = torch.nn.functional.pad(index.diagonals.long().cumsum(dim=1), (1, 0))  # [H, N+1]
    column_any = column_tiles(index)
    parts = []
    for j in range(tile // strip):
        # diagonals s in [tile t + strip j - tile + 1, tile t + strip j + strip - 1]
        low = (tiles * tile + strip * j - tile + 1).clamp(0, num_tokens)
        high = (tiles * tile + strip * j + strip).clamp(0, num_tokens)
        by_distance = (prefix[:, high] - prefix[:, low]) > 0  # [H, Kt] over t
        touched = by_distance[:, distance.clamp(min=0)] & causal
        rows = torch.nn.functional.pad(index.full_rows, (0, num_tiles * tile - num_tokens))
        rows = rows.view(num_heads, num_tiles, tile // strip, strip)[:, :, j].any(dim=2)
        touched |= rows[:, :, None] & causal
        touched |= index.blocks[:, :num_tiles, :num_tiles] & causal
        touched |= column_any[:, None, :] & (distance == 0)
        parts.append(touched)
    return torch.stack(parts, dim=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strip", type=int, default=0,
                        help="positions per packed program (default tile / group: 64 rows; "
                             "32 with group 4 is a 128-row program)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape = LLAMA_8B
    group = shape.q_heads // shape.kv_heads
    strip = args.strip or shape.tile // group
    started = time.time()
    query, keys, values = structured_qkv(args.tokens, shape, seed=args.tokens, device="cpu")
    key_cache, _, block_table = make_paged_kv(keys, values, shape.cache_block, seed=args.tokens)
    del values
    scale = 1 / math.sqrt(shape.head_dim)
    # heads of one KV group, and a control: one head from each of `group` different groups
    same = [list(range(g * group, (g + 1) * group)) for g in range(shape.kv_heads)]
    mixed = [[(g + i) % shape.kv_heads * group + i for i in range(group)]
             for g in range(shape.kv_heads)]
    result = {"tokens": args.tokens, "shape": vars(shape), "strip": strip, "configs": {},
              "inputs": "minference_kernel.structured_qkv (seed = tokens)"}
    for name, patterns in layer_configs(shape, smoke=False).items():
        index = estimate_index(query, key_cache, block_table[0], args.tokens, args.tokens,
                               patterns, scale)
        touched = strip_touched(index, strip)  # [H, Qt, S, Kt]
        per_head_tiles = float(touched.any(dim=2).sum())  # 64-row query tiles, per head
        entry = {"per_head_tile_visits": per_head_tiles}
        for label, groups in (("same_group", same), ("mixed_groups", mixed)):
            union = sum(float(touched[members].any(dim=0).sum()) for members in groups)
            # in 64x64 tensor-core tiles: a packed visit is G x strip rows, so it counts
            # G x strip / 64 tiles (1 for 64-row programs, 2 for 128-row ones)
            union *= group * strip / shape.tile
            entry[f"packed_tile_visits_{label}"] = union
            entry[f"packed_over_per_head_{label}"] = union / per_head_tiles
        result["configs"][name] = entry
        print(name, json.dumps(entry), flush=True)
        del index, touched
    result["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
