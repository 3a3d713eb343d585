"""How predictable are each kind's active channels? (issue 25, README "Left" item 3.)

The engine preloads attn_in / mlp_in channels predicted from the residual stream N = 2
layers ahead, and o_in / down_in channels by in-sequence LFU counts. This measures, on the
original SmolLM2-135M and held-out Apache-2.0 text, with TEAL thresholds calibrated on GPL-3
(as everywhere else): for each (layer, kind) and token, the precision of a predicted set of
the same size as the true active set (so precision = recall; chance = the active share):
  residual   |rmsnorm(h_l) * gamma_{l+2}| > tau_{l+2}, top by magnitude (attn_in, mlp_in)
  prev_token the same layer's active set one token earlier
  lfu        the channels most often active so far in this sequence (ties: lower index)
No timing: a quality measurement, run under the shared lock.

    flock -s /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/mobile_activeflow_predict.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mobile.activeflow.corpus import APACHE, CALIBRATION  # noqa: E402
from mobile.activeflow.distill import KIND_PROBE, calibrate, load_model  # noqa: E402
from mobile.activeflow.text import load_tokenizer  # noqa: E402

MODEL = ROOT / "data/models/smollm2-135m-instruct"
RESULTS = ROOT / "benchmarks" / "results"
LOOKAHEAD = 2


def capture(model, ids: list[int]) -> tuple[dict, list[np.ndarray]]:
    """Unmasked inputs of every (layer, kind) [T, C] and the residual entering each layer."""
    seen: dict = {}
    handles = []
    for layer, block in enumerate(model.model.layers):
        for kind, name in KIND_PROBE.items():
            handles.append(
                block.get_submodule(name).register_forward_pre_hook(
                    lambda _m, a, key=(layer, kind): seen.__setitem__(key, a[0][0].numpy().copy())
                )
            )
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    for h in handles:
        h.remove()
    return seen, [h[0].numpy() for h in out.hidden_states]


def top_same_size(score: np.ndarray, k: int) -> np.ndarray:
    pred = np.zeros(score.size, bool)
    if k:
        pred[np.argsort(-score, kind="stable")[:k]] = True
    return pred


def precision(pred: np.ndarray, act: np.ndarray) -> float:
    return float((pred & act).sum() / max(1, pred.sum()))


def measure(model, inputs: dict, hidden: list, th: dict, eps: float) -> dict:
    res: dict = defaultdict(lambda: defaultdict(list))
    for (layer, kind), x in inputs.items():
        active = np.abs(x) > th[(layer, kind)]
        counts = np.zeros(x.shape[1])
        for t in range(x.shape[0]):
            act, k = active[t], int(active[t].sum())
            res[kind]["chance"].append(k / act.size)
            if t > 0:
                # same size as the truth: the earlier set, trimmed or padded by LFU counts
                prev = active[t - 1].astype(float) + counts * 1e-6
                res[kind]["prev_token"].append(precision(top_same_size(prev, k), act))
                res[kind]["lfu"].append(precision(top_same_size(counts, k), act))
            counts += act
            if kind in ("attn_in", "mlp_in") and layer >= LOOKAHEAD:
                block = model.model.layers[layer]
                norm = (
                    block.input_layernorm if kind == "attn_in" else block.post_attention_layernorm
                )
                h = hidden[layer - LOOKAHEAD][t]
                x_hat = h / np.sqrt(np.mean(h * h) + eps) * norm.weight.detach().numpy()
                res[kind]["residual"].append(precision(top_same_size(np.abs(x_hat), k), act))
    return {kind: {p: float(np.mean(v)) for p, v in d.items()} for kind, d in res.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(MODEL)
    calib = tok.encode(CALIBRATION.read_text()).ids[:256]
    ids = tok.encode(APACHE.read_text()).ids[: args.tokens]
    model = load_model(MODEL).eval()
    eps = model.config.rms_norm_eps
    inputs, hidden = capture(model, ids)
    out = {
        "date": dt.date.today().isoformat(),
        "script": "benchmarks/mobile_activeflow_predict.py",
        "tokens": len(ids),
        "lookahead_layers": LOOKAHEAD,
        "by_sparsity": {},
    }
    for sp in (0.5, 0.7):
        th = calibrate(model, calib, sp)
        out["by_sparsity"][str(sp)] = r = measure(model, inputs, hidden, th, eps)
        for kind, d in r.items():
            print(f"sp {sp} {kind}: " + ", ".join(f"{p} {v:.3f}" for p, v in d.items()), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "mobile_activeflow_predict.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
