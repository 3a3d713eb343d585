"""Logit fidelity of per-head sparse prefill (MInference search result, alone and combined
with TriangleMix) vs dense on SmolLM2-135M, on long real text (DESIGN.md, "Fidelity").

Float32 HF forward, single-shot prefill, byte-identical token ids for every method (their
sha256 is stored). Per method and document: KL(dense || method) over the full vocabulary,
top-1 agreement of next-token distributions, perplexity (whole and second half), per
1024-position buckets, and the attention work kept (kept pairs over causal pairs, all heads
of all layers, dense heads counting 1). Documents: ordinary text (GPL-3) and a repeat document
(GFDL-1.3's first half, twice: long-range copying). The search used other texts.

Methods:
- ``searched``: the committed config (``attention_backends/patterns/minference/configs``);
- ``trianglemix``: TriangleMix's measured SmolLM2 split (layers >= 24 triangle 8/512/128);
- ``searched+trianglemix``: the searched heads below layer 24, triangle from 24 on (the
  combination TriangleMix's paper reports);
- ``negative_control``: every head A-shape with 4 sinks and a 64-token window. It must lose
  the repeat (its rows cannot reach the first copy), showing that the measure can fail.

    .venv/bin/python benchmarks/minference_fidelity.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends.patterns.minference import AShapeHead, DenseHead, TriangleHead  # noqa: E402
from attention_backends.patterns.minference.heads import LayerHeadPatterns  # noqa: E402
from attention_backends.patterns.minference.hf_model import (  # noqa: E402
    load_model,
    logits_with_policy,
)
from attention_backends.patterns.minference.policy import (  # noqa: E402
    HeadPatternPolicy,
    committed_config,
    uniform_policy,
)
from attention_backends.policy import MEASURED_DENSE_FIRST_LAYERS, ModelFingerprint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEXT_DOC = "/usr/share/common-licenses/GPL-3"
REPEAT_DOC = "/usr/share/common-licenses/GFDL-1.3"
BUCKET_TOKENS = 1024


def log(message: str) -> None:
    print(f"[minference-fidelity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def documents(tokenizer, num_tokens: int) -> dict[str, list[int]]:
    def ids(path: str, count: int) -> list[int]:
        return tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"][:count]

    half = ids(REPEAT_DOC, num_tokens // 2)
    return {"text": ids(TEXT_DOC, num_tokens), "repeat": half + half}


def compare(dense_logits: torch.Tensor, method_logits: torch.Tensor, ids: list[int]) -> dict:
    dense_lp = torch.log_softmax(dense_logits[:-1].double(), -1)
    method_lp = torch.log_softmax(method_logits[:-1].double(), -1)
    targets = torch.tensor(ids[1:])
    kl = (dense_lp.exp() * (dense_lp - method_lp)).sum(-1)
    agree = (dense_lp.argmax(-1) == method_lp.argmax(-1)).double()
    nll_dense = -dense_lp.gather(1, targets[:, None])[:, 0]
    nll_method = -method_lp.gather(1, targets[:, None])[:, 0]
    half = len(targets) // 2
    buckets = [{"positions": [start + 1, min(start + BUCKET_TOKENS, len(kl))],
                "kl": float(kl[start:start + BUCKET_TOKENS].mean()),
                "top1_agreement": float(agree[start:start + BUCKET_TOKENS].mean())}
               for start in range(0, len(kl), BUCKET_TOKENS)]
    return {"kl_mean": float(kl.mean()), "top1_agreement": float(agree.mean()),
            "ppl_dense": float(nll_dense.mean().exp()),
            "ppl_method": float(nll_method.mean().exp()),
            "ppl_dense_second_half": float(nll_dense[half:].mean().exp()),
            "ppl_method_second_half": float(nll_method[half:].mean().exp()),
            "buckets": buckets}


def combined(searched: HeadPatternPolicy, first_triangle_layer: int) -> HeadPatternPolicy:
    heads = searched.fingerprint.num_attention_heads
    layers = tuple(layer if index < first_triangle_layer
                   else LayerHeadPatterns((TriangleHead(),) * heads, layer.block_size)
                   for index, layer in enumerate(searched.layers))
    return HeadPatternPolicy(searched.fingerprint, layers)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for doc_index, doc in enumerate(("text", "repeat")):
        ax = axes[doc_index]
        for method in methods:
            buckets = result["methods"][method]["documents"][doc]["buckets"]
            ax.plot([b["positions"][1] for b in buckets], [b["top1_agreement"] for b in buckets],
                    "o-", label=method)
        ax.set(title=f"top-1 agreement with dense, {doc}", xlabel="position", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    ax = axes[2]
    work = [result["methods"][m]["attention_work_kept"] for m in methods]
    kl_text = [result["methods"][m]["documents"]["text"]["kl_mean"] for m in methods]
    kl_repeat = [result["methods"][m]["documents"]["repeat"]["kl_mean"] for m in methods]
    x = range(len(methods))
    ax.bar([i - 0.27 for i in x], work, 0.27, label="attention work kept")
    ax.bar(list(x), kl_text, 0.27, label="KL text")
    ax.bar([i + 0.27 for i in x], kl_repeat, 0.27, label="KL repeat")
    ax.set_xticks(list(x), methods, rotation=15, fontsize=8)
    ax.set_yscale("log")
    ax.set(title=f"SmolLM2-135M, {result['tokens']} tokens, HF fp32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path,
                        default=Path("data/models/smollm2-135m-instruct"))
    parser.add_argument("--config", type=Path, default=None, help="head-pattern JSON")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS / "minference_fidelity.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model)
    fingerprint = ModelFingerprint.from_config_json(args.model / "config.json")
    config_path = args.config or committed_config(fingerprint)
    searched = HeadPatternPolicy.load(config_path, fingerprint)
    split = MEASURED_DENSE_FIRST_LAYERS[fingerprint]
    policies = {
        "searched": searched,
        "trianglemix": uniform_policy(
            fingerprint, lambda layer: DenseHead() if layer < split else TriangleHead()),
        "searched+trianglemix": combined(searched, split),
        "negative_control": uniform_policy(fingerprint, lambda layer: AShapeHead(4, 64)),
    }
    docs = documents(tokenizer, args.tokens)
    result = {
        "script": "benchmarks/minference_fidelity.py", "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model), "fingerprint": fingerprint.__dict__, "tokens": args.tokens,
        "config": str(config_path), "config_sha256": hashlib.sha256(
            config_path.read_bytes()).hexdigest(),
        "documents": {name: {"source": TEXT_DOC if name == "text" else REPEAT_DOC,
                             "tokens": len(ids), "sha256_of_ids": hashlib.sha256(
                                 json.dumps(ids).encode()).hexdigest()}
                      for name, ids in docs.items()},
        "methods": {},
    }
    dense = {}
    for name, ids in docs.items():
        began = time.time()
        dense[name] = logits_with_policy(model, ids, uniform_policy(fingerprint,
                                                                    lambda layer: DenseHead()))
        log(f"dense {name}: {time.time() - began:.0f} s")
    num_layers, heads = fingerprint.num_layers, fingerprint.num_attention_heads
    for method, policy in policies.items():
        entry: dict = {"documents": {}, "sparse_layers": policy.sparse_layers(num_layers)}
        kept_total = 0.0
        for name, ids in docs.items():
            kept: dict[int, torch.Tensor] = {}
            began = time.time()
            logits = logits_with_policy(model, ids, policy,
                                        lambda layer, index, kept=kept: kept.__setitem__(
                                            layer, index.kept_fraction()))
            seconds = time.time() - began
            work = (sum(float(f.sum()) for f in kept.values())
                    + heads * (num_layers - len(kept))) / (heads * num_layers)
            entry["documents"][name] = compare(dense[name], logits, ids) | {
                "attention_work_kept": work, "seconds": round(seconds, 1)}
            kept_total += work / len(docs)
            log(f"{method} {name}: KL {entry['documents'][name]['kl_mean']:.4f} top-1 "
                f"{entry['documents'][name]['top1_agreement']:.3f} work {work:.3f} "
                f"({seconds:.0f} s)")
        entry["attention_work_kept"] = kept_total
        result["methods"][method] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and its PNG")


if __name__ == "__main__":
    main()
