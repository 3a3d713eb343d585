"""Activation sparsity by per-layer magnitude thresholds (digest §1.2, TEAL-style).

For each (layer, kind) input x, channel j is active iff |x_j| > tau. tau is the `sparsity`
quantile of |x| over calibration tokens of local text, so on similar text that share of
channels is skipped. Ops that share an input (q/k/v; gate/up) share a threshold because
their rows are one extent on flash (layout.py): reading q's channel reads k's and v's too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from mobile.activeflow.engine import ActiveFlowEngine

Thresholds = dict[tuple[int, str], float]


def collect_abs_inputs(engine: ActiveFlowEngine, token_ids: list[int],
                       progress: bool = False) -> dict[tuple[int, str], np.ndarray]:
    """|x| of every (layer, kind) input while the engine reads `token_ids` as one sequence."""
    seen: dict[tuple[int, str], list[np.ndarray]] = defaultdict(list)
    engine.observer = lambda layer, kind, x: seen[(layer, kind)].append(np.abs(x))
    try:
        engine.reset()
        for i, tok in enumerate(token_ids):
            engine.forward_token(tok)
            if progress and (i + 1) % 16 == 0:
                print(f"  calibration token {i + 1}/{len(token_ids)}", flush=True)
    finally:
        engine.observer = None
    return {key: np.concatenate(v) for key, v in seen.items()}


def thresholds_for(abs_inputs: dict[tuple[int, str], np.ndarray], sparsity: float) -> Thresholds:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError("sparsity must be in [0, 1)")
    if sparsity == 0.0:
        return {key: -1.0 for key in abs_inputs}  # every channel active, even exact zeros
    return {key: float(np.quantile(v, sparsity)) for key, v in abs_inputs.items()}


def realized_sparsity(abs_inputs: dict[tuple[int, str], np.ndarray],
                      thresholds: Thresholds) -> dict[tuple[int, str], float]:
    return {key: float(np.mean(v <= thresholds[key])) for key, v in abs_inputs.items()}


def save_thresholds(path: Path, by_sparsity: dict[float, Thresholds]) -> None:
    Path(path).write_text(json.dumps({
        str(sp): [[layer, kind, tau] for (layer, kind), tau in th.items()]
        for sp, th in by_sparsity.items()}))


def load_thresholds(path: Path) -> dict[float, Thresholds]:
    raw = json.loads(Path(path).read_text())
    return {float(sp): {(int(layer), kind): float(tau) for layer, kind, tau in rows}
            for sp, rows in raw.items()}
