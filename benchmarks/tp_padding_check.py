"""Real SmolLM2-135M weights: the TP-splittable padded copy (server/tp_padding.py) computes the
same logits as the original (HF transformers, fp32, CPU), on real text and random tokens.

Per row: max |padded - original| / max(1, max |original|), reported as its maximum over rows
against the unit test's bound (1e-4), plus top-1 agreement and the greedy continuation of a
few prompts. A negative control pads with a wrong KV mapping (tiled) and must fail the bound.

    .venv/bin/python benchmarks/tp_padding_check.py --src data/models/smollm2-135m-instruct \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server import tp_padding  # noqa: E402

REL_BOUND = 1e-4
TEXT = Path("/usr/share/common-licenses/GPL-3")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Q: What is 17 times 23?\nA:"]


def compare(original, padded) -> dict:
    import torch

    scale = original.abs().amax(dim=-1).clamp(min=1.0)
    rel = (padded - original).abs().amax(dim=-1) / scale
    return {
        "rows": int(original.shape[0]),
        "max_row_rel_error": float(rel.max()),
        "median_row_rel_error": float(rel.median()),
        "bound": REL_BOUND,
        "within_bound": bool(rel.max() <= REL_BOUND),
        "top1_agreement": float(
            (padded.argmax(-1) == original.argmax(-1)).to(torch.float32).mean()
        ),
    }


def run(src: Path, tokens_count: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(src)
    text_ids = tokenizer(TEXT.read_text())["input_ids"][:tokens_count]
    rng = random.Random(0)
    inputs = {
        "text": torch.tensor([text_ids]),
        "random": torch.tensor([[rng.randrange(100, 49000) for _ in range(512)]]),
    }
    result: dict = {
        "benchmark": "tp_padding_check",
        "date": time.strftime("%Y-%m-%d"),
        "src": str(src),
        "dtype": "float32",
        "device": "cpu",
    }
    with tempfile.TemporaryDirectory() as tmp:
        padded_dir, wrong_dir = Path(tmp) / "padded", Path(tmp) / "wrong"
        padding = tp_padding.pad_model_dir(src, padded_dir, 2)
        result["padding"] = {
            "from": [padding.num_heads, padding.num_kv_heads],
            "to": [padding.padded_heads, padding.padded_kv_heads],
            "kv_repeat": padding.kv_repeat,
        }
        good_pad = tp_padding.pad_tensor

        def tiled(name, tensor, padding, head_dim):
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                return tensor.repeat(padding.kv_repeat, 1)
            return good_pad(name, tensor, padding, head_dim)

        tp_padding.pad_tensor = tiled
        try:
            tp_padding.pad_model_dir(src, wrong_dir, 2)
        finally:
            tp_padding.pad_tensor = good_pad
        models = {
            name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in (
                ("original", src),
                ("padded", padded_dir),
                ("wrong_kv_mapping", wrong_dir),
            )
        }
        with torch.no_grad():
            logits = {
                name: {key: model(ids).logits[0] for key, ids in inputs.items()}
                for name, model in models.items()
            }
            result["logits"] = {
                f"{name}_vs_original@{key}": compare(logits["original"][key], logits[name][key])
                for name in ("padded", "wrong_kv_mapping")
                for key in inputs
            }
            result["logits"]["text_tokens"] = len(text_ids)
            greedy = {}
            for prompt in PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                outs = {
                    name: tokenizer.decode(
                        models[name].generate(ids, max_new_tokens=24, do_sample=False)[0][
                            ids.shape[1] :
                        ]
                    )
                    for name in ("original", "padded")
                }
                greedy[prompt] = {**outs, "same": outs["original"] == outs["padded"]}
            result["greedy_hf_fp32"] = greedy
    return result


def plot(result: dict, png: Path) -> None:
    """Per-row relative error (max and median) of the padded copy and of the wrong-mapping
    control, log scale, with the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {key: value for key, value in result["logits"].items() if isinstance(value, dict)}
    fig, axis = plt.subplots(figsize=(9, 3.2))
    labels = [key.replace("_vs_original", "") for key in rows]
    axis.barh(labels, [v["max_row_rel_error"] for v in rows.values()], label="max over rows")
    axis.barh(
        labels, [v["median_row_rel_error"] for v in rows.values()], height=0.4, label="median"
    )
    axis.axvline(REL_BOUND, color="black", ls=":", label=f"bound {REL_BOUND:g}")
    axis.set_xscale("log")
    axis.set_xlabel("per-row max |logit diff| / max(1, max |logit|) vs the original")
    axis.set_title("SmolLM2-135M padded 9/3 -> 12/6 heads, HF fp32 (CPU)")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path("data/models/smollm2-135m-instruct"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--plot-only", type=Path, help="draw the PNG of a result JSON")
    args = parser.parse_args()
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return
    result = run(args.src, args.tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tp_padding_check.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "tp_padding_check.png")
    print(json.dumps(result["logits"], indent=1))
    print(json.dumps({p: v["same"] for p, v in result["greedy_hf_fp32"].items()}))


if __name__ == "__main__":
    main()
