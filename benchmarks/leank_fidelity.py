"""LeanK logit fidelity vs dense on SmolLM2-135M, plain torch (HF fp32 forward, CPU).

Variants on byte-identical token ids: dense; the trained mask (``--mask``); a random mask
with the same per-head budgets (does training matter?); the trained importance under
layer-uniform budgets (one K row width for all layers, what vLLM pages want); and a too-high
sparsity derived from the trained importance (negative control, not separately trained);
plus ``--sweep`` sparsities from the same importance, to choose the sparsity by measurement.
With --mode decode (default) every position is one decode step after a dense prefill of the
text before it (kv_manager/leank/simulate.py), which is what serving does for the first
generated token; --mode all zeroes the dropped channels at every position of the pass
(harsher: the error compounds, like a long generation with no dense prefill). Documents are
held out of training (kv_manager/leank/train.py HELD_OUT): GPL-3, Apache-2.0, and a repeat
document (the first half of GPL-3, twice) that dense SmolLM2 copies almost perfectly.

Per document and variant: KL(dense || variant) of next-token distributions (full vocab) and
top-1 agreement, overall and per position bucket, and perplexity. Also K/V bytes per token
implied by the mask (computed from the mask, not read from a vLLM worker).
Writes benchmarks/results/leank_fidelity.json and .png.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/leank_fidelity.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_manager.leank.budget import (  # noqa: E402
    aligned_head_budgets,
    layer_uniform_head_budgets,
    topk_keep,
)
from kv_manager.leank.cli import DEFAULT_MASK  # noqa: E402
from kv_manager.leank.layout import LayerLayout  # noqa: E402
from kv_manager.leank.mask import load_mask  # noqa: E402
from kv_manager.leank.train import load_frozen_model, masked_hidden_states  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_DIR = Path("data/models/smollm2-135m-instruct")
DOCS = {"GPL-3": "/usr/share/common-licenses/GPL-3",
        "Apache-2.0": "/usr/share/common-licenses/Apache-2.0"}


def documents(tokenizer, max_tokens: int) -> dict[str, torch.Tensor]:
    docs = {}
    for name, path in DOCS.items():
        ids = tokenizer(Path(path).read_text())["input_ids"][:max_tokens]
        docs[name] = torch.tensor(ids)
    half = docs["GPL-3"][: max_tokens // 2]
    docs["repeat(GPL-3 first half x2)"] = torch.cat([half, half])
    return docs


def logprobs(model, ids: torch.Tensor, keep: torch.Tensor,
             mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense, masked) next-token log-probabilities [tokens - 1, vocab]."""
    with torch.no_grad():
        dense, masked = masked_hidden_states(model, ids.unsqueeze(0), keep.float(), mode)
        return tuple(model.lm_head(h[:-1]).float().log_softmax(-1) for h in (dense, masked))


def compare(dense: torch.Tensor, other: torch.Tensor, ids: torch.Tensor, bucket: int) -> dict:
    kl = (dense.exp() * (dense - other)).sum(-1)
    top1 = (dense.argmax(-1) == other.argmax(-1)).float()
    nll = -other.gather(1, ids[1:].unsqueeze(1)).squeeze(1)
    buckets = []
    for start in range(0, len(kl), bucket):
        part = slice(start, start + bucket)
        buckets.append({"from": start, "kl": round(float(kl[part].mean()), 5),
                        "top1": round(float(top1[part].mean()), 4)})
    return {"kl": round(float(kl.mean()), 5), "top1": round(float(top1.mean()), 4),
            "perplexity": round(float(nll.mean().exp()), 3), "buckets": buckets}


def memory(keep: torch.Tensor, dtype_bytes: int = 2) -> dict:
    totals = {"k_dense": 0, "k_stored": 0, "v_dense": 0, "v_stored": 0}
    for layer in keep:
        for key, value in LayerLayout(layer).bytes_per_token(dtype_bytes).items():
            totals[key] += value
    # vLLM wants one page size for all layers of a KV cache group (research digest 3.5):
    # padded to the widest layer, this is what the first integration would actually save.
    layouts = [LayerLayout(layer) for layer in keep]
    widest_k = max(layout.k_width for layout in layouts) * dtype_bytes
    widest_v = max(len(layout.live_heads) for layout in layouts) * keep.shape[2] * dtype_bytes
    totals["k_stored_uniform_pages"] = widest_k * len(layouts)
    totals["v_stored_uniform_pages"] = widest_v * len(layouts)
    return totals | {"k_saved": round(1 - totals["k_stored"] / totals["k_dense"], 4),
                     "k_saved_uniform_pages": round(
                         1 - totals["k_stored_uniform_pages"] / totals["k_dense"], 4),
                     "v_saved": round(1 - totals["v_stored"] / totals["v_dense"], 4),
                     "capacity_x": round((totals["k_dense"] + totals["v_dense"])
                                         / (totals["k_stored"] + totals["v_stored"]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask", default=str(DEFAULT_MASK))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--bucket", type=int, default=512)
    parser.add_argument("--control-sparsity", type=float, default=0.9)
    parser.add_argument("--trained-only", action="store_true",
                        help="evaluate only the trained mask (no baselines, sweep or control)")
    parser.add_argument("--out", default="leank_fidelity", help="results file stem")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.25, 0.5],
                        help="also evaluate masks at these sparsities from the same importance")
    parser.add_argument("--served-sweep", type=float, nargs="*", default=[],
                        help="also evaluate these sparsities under layer-uniform budgets (the "
                        "masks vLLM serves: one packed K width for all layers)")
    parser.add_argument("--served-only", action="store_true",
                        help="evaluate only --served-sweep and the negative control")
    parser.add_argument("--mode", choices=["decode", "all"], default="decode",
                        help="decode: each position decoded after a dense prefill (serving); "
                        "all: keys masked at every position (harsher)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    mask = load_mask(Path(args.mask))
    budgets = mask.kept_counts
    generator = torch.Generator().manual_seed(0)
    variants = {
        f"leank trained s={mask.sparsity}": mask.keep,
        f"random, same budgets s={mask.sparsity}": topk_keep(
            torch.rand(mask.keep.shape, generator=generator), budgets),
        f"leank layer-uniform s={mask.sparsity} (derived)": topk_keep(
            mask.importance, layer_uniform_head_budgets(mask.importance, mask.sparsity,
                                                        mask.align)),
        **{f"leank derived s={sweep}": topk_keep(
            mask.importance, aligned_head_budgets(mask.importance, sweep, mask.align))
           for sweep in args.sweep},
        **{f"leank layer-uniform s={sweep} (served)": topk_keep(
            mask.importance, layer_uniform_head_budgets(mask.importance, sweep, mask.align))
           for sweep in args.served_sweep},
        f"leank derived s={args.control_sparsity} (negative control)": topk_keep(
            mask.importance, aligned_head_budgets(mask.importance, args.control_sparsity,
                                                  mask.align)),
    }
    if args.served_only:
        variants = {name: keep for name, keep in variants.items()
                    if "(served)" in name or "negative control" in name}
    if args.trained_only:
        variants = {name: keep for name, keep in variants.items() if "trained" in name}
    model = load_frozen_model(MODEL_DIR)
    mask.check_model(type(mask.fingerprint).from_hf_config(model.config), mask.head_dim)
    docs = documents(AutoTokenizer.from_pretrained(str(MODEL_DIR)), args.tokens)
    result = {"script": "benchmarks/leank_fidelity.py", "date": time.strftime("%Y-%m-%d"),
              "mask": args.mask, "tokens": args.tokens, "mode": args.mode, "args": vars(args),
              "device": "cpu fp32 (HF transformers)",
              "memory_fp16_bytes_per_token": {name: memory(keep)
                                              for name, keep in variants.items()},
              "documents": {}}
    for doc_name, ids in docs.items():
        started = time.perf_counter()
        rows: dict[str, dict] = {}
        for name, keep in variants.items():
            dense, masked = logprobs(model, ids, keep, args.mode)
            if not rows:
                nll = -dense.gather(1, ids[1:].unsqueeze(1)).squeeze(1)
                rows["dense"] = {"perplexity": round(float(nll.mean().exp()), 3)}
            rows[name] = compare(dense, masked, ids, args.bucket)
            print(f"{doc_name:28s} {name:44s} kl={rows[name]['kl']:.4f} "
                  f"top1={rows[name]['top1']:.3f} ppl={rows[name]['perplexity']:.2f} "
                  f"(dense {rows['dense']['perplexity']:.2f})", flush=True)
        result["documents"][doc_name] = {"rows": rows,
                                         "seconds": round(time.perf_counter() - started)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{args.out}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = result["documents"]
    fig, axes = plt.subplots(2, len(docs), figsize=(5 * len(docs), 7), squeeze=False)
    for col, (doc_name, doc) in enumerate(docs.items()):
        rows = doc["rows"]
        for name, row in rows.items():
            if "buckets" not in row:
                continue
            x = [b["from"] for b in row["buckets"]]
            axes[0][col].plot(x, [b["kl"] for b in row["buckets"]], marker="o", label=name)
            axes[1][col].plot(x, [b["top1"] for b in row["buckets"]], marker="o", label=name)
        axes[0][col].set_title(f"{doc_name} (dense ppl {rows['dense']['perplexity']})")
        axes[0][col].set_ylabel("KL(dense || variant)")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylabel("top-1 agreement")
        axes[1][col].set_xlabel("position bucket start (tokens)")
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"LeanK fidelity, SmolLM2-135M, {result['tokens']} tokens, mode "
                 f"{result['mode']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
