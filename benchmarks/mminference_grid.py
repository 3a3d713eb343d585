"""MMInference's grid head on synthetic attention with grid structure (no VLM here): the
share of attention mass the grid mask recovers vs the share of 64x64 tiles a kernel must
compute, in token order and after the grid permutation.

Synthetic video-like attention over ``--tokens`` positions: a text prefix, a vision span of
frames of ``stride`` tokens, a text suffix. Per head, scores are a local decay (nearby keys),
a boost on one phase of every frame (the vertical lines), flat rows at one phase (the
horizontal lines) and noise; softmax is causal. Compared masks: the grid head that matches
the structure, and an A-shape head that keeps at least as many pairs (same sinks, larger
window). Recall = mean over rows of the attention mass inside the mask.

    .venv/bin/python benchmarks/mminference_grid.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends.patterns import TrianglePattern  # noqa: E402
from attention_backends.patterns.minference import (  # noqa: E402
    AShapeHead,
    HeadsIndex,
    SequenceChunk,
)
from attention_backends.patterns.mminference.grid import GridHead, grid_positions  # noqa: E402
from attention_backends.patterns.mminference.permutation import (  # noqa: E402
    grid_permutation,
    permuted_tile_mask,
)

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_probs(num_tokens: int, vision: tuple[int, int], stride: int, phase_q: int,
                    phase_k: int, generator: torch.Generator) -> torch.Tensor:
    """Float ``[N, N]`` causal attention probabilities with grid structure."""
    positions = torch.arange(num_tokens)
    distance = (positions[:, None] - positions[None, :]).float()
    scores = 4.0 * torch.exp(-distance.clamp(min=0) / 8.0)  # a local bump
    in_span = (positions >= vision[0]) & (positions < vision[1])
    column = in_span & ((positions - vision[0]) % stride == phase_k)
    row = in_span & ((positions - vision[0]) % stride == phase_q)
    scores = scores + 6.0 * column[None, :].float()
    scores[row] = 0.0  # horizontal lines: flat over every earlier key
    scores = scores + 0.5 * torch.randn(num_tokens, num_tokens, generator=generator)
    scores[:, :4] += 4.0  # attention sinks
    scores.masked_fill_(distance < 0, float("-inf"))
    return torch.softmax(scores, dim=-1)


def tiles(keep: torch.Tensor, perm: torch.Tensor, tile: int) -> int:
    return int(permuted_tile_mask(keep[None], perm, tile).sum())


def evaluate(probs: torch.Tensor, keep: torch.Tensor, tile: int) -> dict:
    """Recall (mean attention mass kept per row), kept pairs and tiles in token order, as
    fractions of causal pairs / causal tiles."""
    num_tokens = probs.shape[0]
    num_tiles = -(-num_tokens // tile)
    return {"recall": float((probs * keep).sum(-1).mean()),
            "kept_pairs": float(keep.sum()) / (num_tokens * (num_tokens + 1) / 2),
            "tiles_token_order": tiles(keep, torch.arange(num_tokens), tile)
            / (num_tiles * (num_tiles + 1) / 2)}


def two_stage_tiles(grid: GridHead, index: HeadsIndex, perm: torch.Tensor, tile: int) -> float:
    """Tiles of MMInference's two passes, over causal tiles: sinks, local band and trailing
    text rows in token order, then the grid lines on the permuted layout (the local band
    would scatter under the permutation, so it never goes there)."""
    num_tokens = index.num_tokens
    lines = HeadsIndex.empty(1, num_tokens, index.block_size)
    end = min(grid.vision_end, num_tokens)
    lines.columns[:, grid_positions(grid.vision_start, end, grid.stride, grid.phase_k)] = True
    lines.full_rows[:, grid_positions(grid.vision_start, end, grid.stride, grid.phase_q)] = True
    base = HeadsIndex.empty(1, num_tokens, index.block_size)
    base.columns[:, : grid.sink_tokens] = True
    base.diagonals[:, : grid.window_tokens] = True
    base.full_rows[:, grid.vision_end :] = True
    rows = torch.arange(num_tokens)
    num_tiles = -(-num_tokens // tile)
    computed = (tiles(base.keep_mask(rows)[0], rows, tile)
                + tiles(lines.keep_mask(rows)[0], perm, tile))
    return computed / (num_tiles * (num_tiles + 1) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--strides", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "mminference_grid.json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    n = args.tokens
    rows = []
    for stride in args.strides:
        vision = (128, 128 + ((n - 256) // stride) * stride)
        grid = GridHead(vision[0], vision[1], stride, phase_q=stride // 3, phase_k=stride // 2,
                        sink_tokens=4, window_tokens=64)
        probs = synthetic_probs(n, vision, stride, grid.phase_q, grid.phase_k, generator)
        chunk = SequenceChunk(torch.zeros(n, 1, 1), torch.arange(n), torch.zeros(n, 1, 1), n, 1.0)
        grid_index = grid.build(chunk, [0], args.tile)
        grid_keep = grid_index.keep_mask(torch.arange(n))[0]
        kept = float(grid_keep.sum()) / (n * (n + 1) / 2)
        # an A-shape that keeps at least the grid's share of pairs
        window = max(int(kept * (n + 1) / 2), 1)
        while TrianglePattern(4, window, 0).kept_fraction(n) < kept and window < n:
            window = min(int(window * 1.05) + 1, n)
        a_shape = AShapeHead(4, min(window, n)).build(chunk, [0], args.tile)
        a_keep = a_shape.keep_mask(torch.arange(n))[0]
        perm = grid_permutation(n, vision[0], vision[1], stride)
        rows.append({"stride": stride, "vision": list(vision),
                     "grid": evaluate(probs, grid_keep, args.tile) | {
                         "tiles_two_stage_permuted": two_stage_tiles(grid, grid_index, perm,
                                                                     args.tile)},
                     "a_shape_same_budget": evaluate(probs, a_keep, args.tile)
                     | {"window_tokens": min(window, n)}})
        print(json.dumps(rows[-1]))
    result = {"script": "benchmarks/mminference_grid.py", "date": time.strftime("%Y-%m-%d"),
              "tokens": n, "tile": args.tile, "seed": args.seed, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    strides = [str(r["stride"]) for r in result["rows"]]
    x = range(len(strides))
    axes[0].bar([i - 0.2 for i in x], [r["grid"]["recall"] for r in result["rows"]], 0.4,
                label="grid head")
    axes[0].bar([i + 0.2 for i in x], [r["a_shape_same_budget"]["recall"]
                                       for r in result["rows"]], 0.4,
                label="A-shape, >= same kept pairs")
    axes[0].set_xticks(list(x), strides)
    axes[0].set(xlabel="frame stride (tokens)", ylabel="attention mass recovered", ylim=(0, 1))
    axes[0].legend()
    width = 0.27
    axes[1].bar([i - width for i in x], [r["grid"]["tiles_token_order"]
                                         for r in result["rows"]], width,
                label="grid, token order")
    axes[1].bar(list(x), [r["grid"]["tiles_two_stage_permuted"] for r in result["rows"]],
                width, label="grid, band in order + lines permuted")
    axes[1].bar([i + width for i in x], [r["a_shape_same_budget"]["tiles_token_order"]
                                         for r in result["rows"]], width,
                label="A-shape, same kept pairs")
    axes[1].set_xticks(list(x), strides)
    axes[1].set(xlabel="frame stride (tokens)",
                ylabel=f"causal {result['tile']}x{result['tile']} tiles computed")
    axes[1].legend()
    fig.suptitle(f"synthetic grid attention, {result['tokens']} tokens (no VLM here)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
