"""SecurityLingua extraction quality on held-out template families, per model variant.

For each artifact given: word-level keep precision / recall / F1 against the exact labels,
the share of prompts whose request is recoverable from the intention (>= 80% of its words
kept), and the share of words wrongly kept on all-template prompts; overall (micro), per
held-out family, and macro over the four held-out families. Also scored on the training
families with held-out goals (HarmBench), to separate "new wrapper" from "new goal".
Writes benchmarks/results/securitylingua_extraction.json and .png (or `--out-name`).

    .venv/bin/python benchmarks/securitylingua_extraction.py NAME=ARTIFACT_DIR[:int8|:bf16][@CHUNK]

CHUNK: inference chunk length in pieces (default: the artifact's training length).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_pipeline.securitylingua.evaluate import extraction_metrics  # noqa: E402
from prompt_pipeline.securitylingua.generator import (  # noqa: E402
    EVAL_FAMILIES,
    TRAIN_FAMILIES,
    eval_samples,
)
from prompt_pipeline.token_classifier import TokenClassifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", help="NAME=ARTIFACT_DIR[:int8|:bf16][@CHUNK]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-name", default="securitylingua_extraction",
                        help="results file stem in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    held_out = eval_samples()
    seen_families = eval_samples(families=TRAIN_FAMILIES)
    report: dict = {"script": "benchmarks/securitylingua_extraction.py",
                    "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
                    platform.machine(), "held_out_families": list(EVAL_FAMILIES),
                    "held_out_prompts": len(held_out), "variants": {}}
    for variant in args.variants:
        name, spec = variant.split("=", 1)
        spec, _, chunk_tokens = spec.partition("@")
        directory, _, quantize = spec.partition(":")
        classifier = TokenClassifier.load(directory, quantize or None,
                                          int(chunk_tokens) if chunk_tokens else None)
        config = json.loads((Path(directory) / "config.json").read_text())
        started = time.perf_counter()
        held = extraction_metrics(classifier, held_out)
        seen = extraction_metrics(classifier, seen_families)
        families = [held[f"family:{family}"] for family in EVAL_FAMILIES]
        report["variants"][name] = {
            "artifact": directory, "encoder": config["encoder"], "quantize": quantize or None,
            "max_chunk_tokens": classifier.max_chunk_tokens,
            "training": config["extra"],
            "held_out": held,
            "held_out_macro_f1": sum(f["f1"] for f in families) / len(families),
            "held_out_macro_recoverable": sum(f["recoverable_share"] for f in families)
            / len(families),
            "seen_families_new_goals": {k: v for k, v in seen.items() if k in
                                        ("all", "template_only", "kind:harmful", "kind:benign")},
            "eval_seconds": round(time.perf_counter() - started, 1),
        }
        print(name, json.dumps({k: report["variants"][name][k] for k in
                                ("held_out_macro_f1", "held_out_macro_recoverable")}),
              "micro", round(held["all"]["f1"], 3))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / f"{args.out_name}.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*EVAL_FAMILIES, "plain", "benign_wrapper"]
    names = list(report["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        held = report["variants"][name]["held_out"]
        xs = [g + index * width for g in range(len(groups))]
        axes[0].bar(xs, [held[f"family:{g}"]["f1"] for g in groups], width, label=name)
        axes[1].bar(xs, [held[f"family:{g}"]["recoverable_share"] for g in groups], width,
                    label=name)
    for axis, title in zip(axes, ("keep-word F1", "request recoverable (>=80% words kept)"),
                           strict=True):
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20)
        axis.set_ylim(0, 1)
        axis.set_title(title)
        axis.legend(fontsize=8)
    fig.suptitle("SecurityLingua extraction on held-out families + held-out goals (HarmBench, "
                 f"lookalikes), {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
