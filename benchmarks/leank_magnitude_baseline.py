"""Is LeanK's fidelity on SmolLM2 limited by its training or by the model? A training-free
baseline against the trained importance, at the same aligned budgets.

Magnitude importance of post-RoPE K channel i of a KV head: E[q_i^2] * E[k_i^2], where q runs
over the head's query group (the score is sum_i q_i k_i, so this is the channel's share of
the score's second moment if q and k were independent), measured over 4 x 2,048 tokens of the
training corpus (never the held-out documents). Both importances go through the same
``aligned_head_budgets`` + ``topk_keep`` and the same decode-after-dense-prefill evaluation as
``leank_fidelity.py`` (GPL-3, first ``--tokens`` tokens).

    flock -s /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/leank_magnitude_baseline.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from leank_fidelity import MODEL_DIR, RESULTS, compare, documents, logprobs  # noqa: E402

import kv_manager.leank.train as leank_train  # noqa: E402
from kv_manager.leank.budget import aligned_head_budgets, topk_keep  # noqa: E402
from kv_manager.leank.cli import DEFAULT_MASK  # noqa: E402
from kv_manager.leank.mask import load_mask  # noqa: E402

CALIBRATION_STARTS = (0, 5000, 10000, 15000)
CALIBRATION_TOKENS = 2048


def magnitude_importance(model) -> torch.Tensor:
    """float [layers, kv_heads, head_dim]: E[q_i^2] (over the query group) * E[k_i^2]."""
    from transformers import AttentionInterface

    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // kv_heads
    query_power = torch.zeros(layers, kv_heads, head_dim)
    key_power = torch.zeros(layers, kv_heads, head_dim)
    plain = leank_train._scaled_key_attention

    def recording(module, query, key, value, attention_mask, **kwargs):
        q = query[0].float().view(kv_heads, group, query.shape[2], head_dim)
        query_power[module.layer_idx] += q.pow(2).mean(dim=(1, 2))
        key_power[module.layer_idx] += key[0].float().pow(2).mean(dim=1)
        return plain(module, query, key, value, attention_mask, **kwargs)

    corpus = leank_train.corpus_tokens(MODEL_DIR, leank_train.DEFAULT_CORPUS)
    AttentionInterface.register(leank_train.ATTENTION_NAME, recording)
    try:
        with torch.no_grad():
            for start in CALIBRATION_STARTS:
                window = corpus[start: start + CALIBRATION_TOKENS].unsqueeze(0)
                model.model(input_ids=window)
    finally:
        AttentionInterface.register(leank_train.ATTENTION_NAME, plain)
    return query_power * key_power


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5, 0.7])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", default="leank_magnitude_baseline")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / f"{args.out}.json").read_text()), RESULTS / f"{args.out}.png")
        return
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    model = leank_train.load_frozen_model(MODEL_DIR)
    mask = load_mask(DEFAULT_MASK)
    importances = {"trained (stage 2)": mask.importance, "magnitude": magnitude_importance(model)}
    ids = documents(AutoTokenizer.from_pretrained(str(MODEL_DIR)), args.tokens)["GPL-3"]
    rows = []
    for sparsity in args.sparsity:
        for name, importance in importances.items():
            keep = topk_keep(importance, aligned_head_budgets(importance, sparsity, mask.align))
            started = time.perf_counter()
            dense, masked = logprobs(model, ids, keep, "decode")
            shown = compare(dense, masked, ids, 512)
            rows.append({"importance": name, "sparsity": sparsity,
                         **{key: shown[key] for key in ("kl", "top1", "perplexity")},
                         "seconds": round(time.perf_counter() - started)})
            print(rows[-1], flush=True)
    result = {"script": "benchmarks/leank_magnitude_baseline.py",
              "date": time.strftime("%Y-%m-%d"), "document": "GPL-3", "tokens": args.tokens,
              "mode": "decode", "mask": str(DEFAULT_MASK), "align": mask.align, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.out}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({row["importance"] for row in result["rows"]}):
        rows = sorted((r for r in result["rows"] if r["importance"] == name),
                      key=lambda r: r["sparsity"])
        x = [r["sparsity"] for r in rows]
        axes[0].plot(x, [r["kl"] for r in rows], marker="o", label=name)
        axes[1].plot(x, [r["top1"] for r in rows], marker="o", label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(dense || masked)")
    axes[1].set_ylabel("top-1 agreement with dense")
    for ax in axes:
        ax.set_xlabel("K channels pruned (sparsity)")
        ax.legend()
    fig.suptitle(f"LeanK channel ranking on SmolLM2-135M, {result['document']} "
                 f"{result['tokens']} tokens, {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
