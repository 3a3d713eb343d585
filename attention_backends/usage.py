"""Per-layer counts of which attention path ran, written by each worker process.

This is how a test (or an operator) sees from outside that the worker's attention went
through tessera's backend, and whether a layer ran dense or sparse: vLLM metrics created in
worker processes never reach `/metrics`, so the counts go to a small JSON file per process
when `TESSERA_ATTENTION_STATS_DIR` is set.
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
        snapshot = {
            "backend": self.backend_name,
            "pid": os.getpid(),
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


def total_usage(stats_dir: Path) -> dict[str, dict[str, int]]:
    """Rows per layer and path, summed over every worker process's snapshot, layers in order."""
    totals: dict[str, dict[str, int]] = {}
    for snapshot in read_usage(stats_dir):
        for layer, paths in snapshot["layers"].items():
            for path, count in paths.items():
                totals.setdefault(layer, {}).setdefault(path, 0)
                totals[layer][path] += count
    return dict(sorted(totals.items(), key=lambda item: int(item[0])))
