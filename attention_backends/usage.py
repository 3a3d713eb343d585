"""Per-layer counts of which attention path ran, written by each worker process.

This is how a test (or an operator) sees from outside that the worker's attention went
through tessera's backend, and whether a layer ran dense or sparse: vLLM metrics created in
worker processes never reach `/metrics`, so the counts go to a small JSON file per process
when `TESSERA_ATTENTION_STATS_DIR` is set.

Under tensor parallelism every rank is its own process and writes its own snapshot, with its
rank, the world size and the heads it holds (``num_heads`` / ``num_kv_heads``: local counts).
Each rank runs every query token on its share of the heads, so readers sum a rank's
snapshots (one per process it ran in) and take the maximum over ranks, never their sum.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path


class AttentionUsage:
    """Query tokens per (layer, path); flushed after the model's last layer of each step."""

    def __init__(self, stats_dir: Path | None, backend_name: str) -> None:
        self.stats_dir = stats_dir
        self.backend_name = backend_name
        self.tokens: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.steps = 0
        # The heads this process's attention layers hold (set by the glue; local under TP).
        self.num_heads: int | None = None
        self.num_kv_heads: int | None = None

    def set_local_heads(self, num_heads: int, num_kv_heads: int) -> None:
        self.num_heads, self.num_kv_heads = int(num_heads), int(num_kv_heads)

    def record(self, layer_index: int, path: str, num_tokens: int) -> None:
        self.tokens[layer_index][path] += num_tokens

    def end_step(self) -> None:
        self.steps += 1
        if self.stats_dir is not None:
            self._write()

    def _write(self) -> None:
        assert self.stats_dir is not None
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        target = self.stats_dir / f"attention-usage-{os.getpid()}.json"
        from attention_backends.tensor_parallel import tensor_parallel_rank

        rank, world_size = tensor_parallel_rank()
        snapshot = {
            "backend": self.backend_name,
            "pid": os.getpid(),
            "tp_rank": rank,
            "tp_world_size": world_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "steps": self.steps,
            "layers": {str(layer): dict(paths) for layer, paths in sorted(self.tokens.items())},
        }
        staging = target.with_suffix(".tmp")
        staging.write_text(json.dumps(snapshot))
        staging.replace(target)  # atomic: readers never see a half-written file


def read_usage(stats_dir: Path) -> list[dict]:
    """Every worker process's latest snapshot in ``stats_dir``."""
    snapshots = sorted(stats_dir.glob("attention-usage-*.json"))
    return [json.loads(path.read_text()) for path in snapshots]


def _sum_layers(snapshots: list[dict]) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for snapshot in snapshots:
        for layer, paths in snapshot["layers"].items():
            for path, count in paths.items():
                totals.setdefault(layer, {}).setdefault(path, 0)
                totals[layer][path] += count
    return dict(sorted(totals.items(), key=lambda item: int(item[0])))


def usage_by_rank(stats_dir: Path) -> dict[int, dict[str, dict[str, int]]]:
    """Rows per layer and path for each tensor-parallel rank, summed over that rank's
    snapshots (snapshots written before ranks were recorded count as rank 0)."""
    ranks: dict[int, list[dict]] = {}
    for snapshot in read_usage(stats_dir):
        ranks.setdefault(int(snapshot.get("tp_rank", 0)), []).append(snapshot)
    return {rank: _sum_layers(snapshots) for rank, snapshots in sorted(ranks.items())}


def total_usage(stats_dir: Path) -> dict[str, dict[str, int]]:
    """Rows per layer and path, summed over the worker processes of each tensor-parallel
    rank; the maximum over ranks (each rank sees every row), layers in order."""
    totals: dict[str, dict[str, int]] = {}
    for per_layer in usage_by_rank(stats_dir).values():
        for layer, paths in per_layer.items():
            for path, count in paths.items():
                mine = totals.setdefault(layer, {})
                mine[path] = max(mine.get(path, 0), count)
    return dict(sorted(totals.items(), key=lambda item: int(item[0])))
